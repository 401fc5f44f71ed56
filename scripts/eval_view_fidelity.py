"""The paper's Table 1 on any denoiser: share of samples in the requested view, per method.

    python scripts/eval_view_fidelity.py guidance=toy                  # about 4 minutes on 2 CPU cores
    python scripts/eval_view_fidelity.py guidance=toy_one_object
    python scripts/eval_view_fidelity.py guidance=sd21 prompt="a corgi standing" num_samples=50 batch_size=8
"""
from __future__ import annotations

import json

from omegaconf import OmegaConf

from perpneg3d.config import instantiate, run_script
from perpneg3d.errors import require
from perpneg3d.evaluation.classifiers import classifier_for
from perpneg3d.evaluation.view_fidelity import evaluate_view_fidelity, markdown_table, to_json
from perpneg3d.guidance.perpneg import MODES
from perpneg3d.prompts import validate_prompt
from perpneg3d.run_dir import new_run_dir


def main(cfg) -> None:
    prompt = validate_prompt(cfg.prompt)
    for m in cfg.methods:
        require(m.mode in MODES, f"methods: mode={m.mode!r} is unknown: use one of {', '.join(MODES)}")
        extra = set(m) - {"mode", "weight", "neg_time_ramp", "alignment", "emphasis"}
        require(not extra, f"methods: {sorted(extra)} unknown: a method has mode, weight, neg_time_ramp, alignment, "
                           "emphasis")
    require(all(v in ("front", "side", "back") for v in cfg.views), f"views={list(cfg.views)}: use front, side, back")
    for key in ("num_samples", "batch_size", "steps"):
        require(int(cfg[key]) >= 1, f"{key}={cfg[key]} must be at least 1")
    out = new_run_dir(cfg.out_dir)
    (out / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    denoiser = instantiate(cfg.guidance.denoiser)
    classifier = classifier_for(denoiser, prompt, cfg.clip_model)
    results = evaluate_view_fidelity(
        denoiser, classifier, prompt, list(cfg.views), OmegaConf.to_container(cfg.methods), num_samples=cfg.num_samples,
        batch_size=cfg.batch_size, steps=cfg.steps, scale=cfg.scale, seed=cfg.seed, out_dir=out)
    table = markdown_table(results, list(cfg.views))
    (out / "results.md").write_text(table + "\n")
    (out / "results.json").write_text(json.dumps(to_json(results), indent=2))
    print(table)
    print(f"\nwrote results.md, results.json and one grid per cell to {out}")


if __name__ == "__main__":
    run_script("eval_view_fidelity", main)
