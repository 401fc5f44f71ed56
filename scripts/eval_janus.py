"""Janus metrics of a trained run: renders at 36 azimuths, classified (docs/method.md, "Metrics").

    python scripts/eval_janus.py run=outputs/toy/2026-11-24_08-00-00
"""
from __future__ import annotations

import json

from perpneg3d.config import run_script
from perpneg3d.devices import resolve_device
from perpneg3d.errors import require
from perpneg3d.evaluation.janus import classifier_camera, janus_metrics
from perpneg3d.training.run_loading import load_run, view_classifier_from_config


def main(cfg) -> None:
    require(cfg.run, "run=<folder> is required: the run folder to evaluate (outputs/<name>/<timestamp>)")
    run_cfg, geometry, renderer, cameras, step, run_dir = load_run(cfg.run, str(resolve_device(cfg.device)))
    classifier = view_classifier_from_config(run_cfg, run_cfg.prompt, cfg.clip_model)
    cam = classifier_camera(classifier, cameras)
    scores = janus_metrics(geometry, renderer, classifier, run_cfg.prompt, elevation=cfg.elevation,
                           n_azimuths=cfg.n_azimuths, strip_path=run_dir / "janus_strip.png", **cam)
    scores["step"] = step
    (run_dir / "janus.json").write_text(json.dumps(scores, indent=2))
    print(f"{run_dir}: front_share {scores['front_share']:.2f}  view_acc {scores['view_acc']:.2f}  "
          f"view_acc_aligned {scores['view_acc_aligned']:.2f}  janus_free {scores['janus_free']}")
    print(f"wrote janus.json and janus_strip.png to {run_dir}")


if __name__ == "__main__":
    run_script("eval_janus", main)
