"""Export a trained run as a coloured mesh for Blender (GLB / OBJ / PLY).

    python scripts/export.py run=outputs/toy/2026-11-24_08-00-00 format=glb
    python scripts/export.py run=... export.formats=[glb,obj,ply] export.texture=uv export.resolution=512
"""
from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

from perpneg3d.config import instantiate, run_script
from perpneg3d.devices import resolve_device
from perpneg3d.errors import require
from perpneg3d.training.run_loading import load_run


def main(cfg) -> None:
    require(cfg.run, "run=<folder> is required: the run folder to export (outputs/<name>/<timestamp>)")
    if cfg.format:
        OmegaConf.update(cfg, "export.formats", [cfg.format])
    exporter = instantiate(cfg.export)
    _, geometry, _, _, step, run_dir = load_run(cfg.run, str(resolve_device(cfg.device)))
    paths = exporter(geometry, Path(cfg.out_dir) if cfg.out_dir else run_dir)
    print(f"exported step {step}: " + ", ".join(str(p) for p in paths))


if __name__ == "__main__":
    run_script("export", main)
