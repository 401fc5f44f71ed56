"""Gather every job of a sweep into one markdown table and a CSV.

    python scripts/collect_sweep.py outputs/multirun/2026-11-24_09-00-00
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

from omegaconf import OmegaConf

from perpneg3d.errors import reported_errors

COLUMNS = ["job", "prompt", "seed", "perp_neg", "guidance", "steps", "seconds_per_step", "nonfinite_steps",
           "front_share", "view_acc", "view_acc_aligned", "janus_free", "status"]


def job_row(job_dir: Path) -> dict:
    row = {"job": job_dir.name, "status": "running or failed"}
    config = job_dir / "config.yaml"
    if config.is_file():
        cfg = OmegaConf.load(config)
        row.update(prompt=cfg.get("prompt"), seed=cfg.get("seed"), perp_neg=OmegaConf.select(cfg, "prompts.perp_neg"),
                   guidance=str(OmegaConf.select(cfg, "guidance.denoiser._target_", default="")).rsplit(".", 1)[-1])
    metrics = job_dir / "metrics.json"
    if metrics.is_file():
        m = json.loads(metrics.read_text())
        row.update(status="done", steps=m.get("steps"), seconds_per_step=m.get("seconds_per_step"),
                   nonfinite_steps=m.get("nonfinite_steps"))
        for key in ("front_share", "view_acc", "view_acc_aligned", "janus_free"):
            if "janus" in m:
                row[key] = m["janus"][key]
    return row


def fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return "" if value is None else str(value)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir", type=Path, help="the multirun folder (outputs/multirun/<timestamp>)")
    parser.add_argument("--out", type=Path, default=None, help="where to write sweep.md/sweep.csv (default: sweep_dir)")
    args = parser.parse_args(argv)
    if not args.sweep_dir.is_dir():
        print(f"error: {args.sweep_dir} is not a folder: pass a multirun folder such as outputs/multirun/<timestamp>", file=sys.stderr)
        return 2
    jobs = sorted((p for p in args.sweep_dir.iterdir() if p.is_dir() and (p / "config.yaml").exists()),
                  key=lambda p: (not p.name.isdigit(), int(p.name) if p.name.isdigit() else p.name))
    if not jobs:
        print(f"error: no job folders with config.yaml in {args.sweep_dir}: is it a perpneg3d multirun folder?", file=sys.stderr)
        return 2
    rows = [job_row(j) for j in jobs]
    out = args.out or args.sweep_dir
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "sweep.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows({k: r.get(k) for k in COLUMNS} for r in rows)
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(fmt(r.get(k)) for k in COLUMNS) + " |" for r in rows]
    (out / "sweep.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"\n{len(rows)} jobs; wrote sweep.md and sweep.csv to {out}")
    return 0


if __name__ == "__main__":
    with reported_errors():  # a user's mistake or Ctrl-C: one line, no traceback
        sys.exit(main())
