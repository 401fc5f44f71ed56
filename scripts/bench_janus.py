"""Janus benchmark (the paper's Table 2 on the toy prior): plain view-prompt SDS vs Perp-Neg SDS.

    python scripts/bench_janus.py                      # 2 methods x 5 seeds of experiment=toy
    python scripts/bench_janus.py seeds=[0,1] 'overrides=[experiment=toy,trainer.max_steps=300]'

Prints per-seed metrics and the number of Janus-free runs per method; writes bench.json,
results.md and montage.png (rows: runs; columns: azimuth 0, 45, ..., 315 at elevation 15).
"""
from __future__ import annotations

import json

import torch
from hydra import compose
from omegaconf import OmegaConf

from perpneg3d.config import run_script
from perpneg3d.images import make_grid, save_png
from perpneg3d.prompts import validate_prompt
from perpneg3d.renderer.orbit import render_rgb
from perpneg3d.run_dir import new_run_dir
from perpneg3d.training.run import train
from perpneg3d.training.run_loading import load_run

MONTAGE_AZIMUTHS = torch.arange(0.0, 360.0, 45.0)


def table(rows: list[dict], methods: list[str]) -> str:
    lines = ["| method | seed | front_share | view_acc | view_acc_aligned | Janus-free |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['seed']} | {r['front_share']:.2f} | {r['view_acc']:.2f} | "
                     f"{r['view_acc_aligned']:.2f} | {'yes' if r['janus_free'] else 'no'} |")
    lines += ["", "| method | Janus-free runs | mean view_acc (absolute orientation) |", "|---|---|---|"]
    for m in methods:
        mine = [r for r in rows if r["method"] == m]
        free = sum(r["janus_free"] for r in mine)
        acc = sum(r["view_acc"] for r in mine) / max(len(mine), 1)
        lines.append(f"| {m} | {free} / {len(mine)} | {acc:.2f} |")
    return "\n".join(lines)


def main(cfg) -> None:
    prompt = validate_prompt(cfg.prompt)
    out = new_run_dir(cfg.out_dir)
    methods = list(cfg.methods)
    rows, montage = [], []
    for method in methods:
        for seed in cfg.seeds:
            overrides = list(cfg.overrides) + list(cfg.methods[method]) + [
                f"seed={seed}", f"out_dir={out}", f"name={method}_seed{seed}", f'prompt="{prompt}"']
            run_dir = train(compose("train", overrides=overrides))
            janus = json.loads((run_dir / "metrics.json").read_text())["janus"]
            rows.append(dict(method=method, seed=int(seed), run=str(run_dir), **{k: janus[k] for k in (
                "front_share", "view_acc", "view_acc_aligned", "janus_free", "best_rotation_deg")}))
            print(f"{method} seed {seed}: front_share {janus['front_share']:.2f} view_acc {janus['view_acc']:.2f} "
                  f"aligned {janus['view_acc_aligned']:.2f} janus_free {janus['janus_free']}", flush=True)
            run_cfg, geometry, renderer, cameras, _, _ = load_run(run_dir)
            res = run_cfg.guidance.denoiser.get("dataset", {}).get("resolution", 64)
            montage.append(render_rgb(geometry, renderer, MONTAGE_AZIMUTHS, torch.full_like(MONTAGE_AZIMUTHS, 15.0),
                                      *cameras.middle(), res))
    text = table(rows, methods)
    print(text)
    (out / "results.md").write_text(text + "\n")
    (out / "bench.json").write_text(json.dumps(dict(rows=rows, config=OmegaConf.to_container(cfg)), indent=2))
    grid = make_grid(torch.cat(montage), nrow=len(MONTAGE_AZIMUTHS), upscale=max(1, 64 // montage[0].shape[-1]))
    save_png(grid, out / "montage.png")
    print(f"wrote results.md, bench.json and montage.png to {out}")


if __name__ == "__main__":
    run_script("bench_janus", main)
