"""The Janus benchmark on the toy prior: methods x objects x seeds, with confidence intervals.

    python scripts/bench_janus.py                                    # plain vs Perp-Neg, 3 objects x 6 seeds
    python scripts/bench_janus.py 'methods=[plain,perpneg,perpneg_time,perpneg_align,perpneg_dsds,perpneg_all]'
    python scripts/bench_janus.py seeds=[0,1] objects=[dog] launcher=basic 'overrides=[experiment=toy,trainer.max_steps=300]'
    python scripts/bench_janus.py objects=[horse,rabbit,chair] world=[horse,rabbit,chair] out_dir=outputs/bench_janus_new

Each (method, object) is one `train.py -m seed=...` sweep through the same Hydra launcher as any sweep
(`launcher=submitit_local`: its jobs run at once and share the cores; `basic`: one after another), into
<out_dir>/<method>/<object>/<seed>/. The benchmark is resumable: a run whose metrics.json exists is
reused, an interrupted one resumes from its checkpoint. Writes bench.md, bench.csv and montage.png
(rows: each method's renders at azimuth 0 and 180; columns: the runs) into out_dir.
"""
from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf
from scipy.stats import binomtest

from perpneg3d.config import compose_config, run_script
from perpneg3d.errors import ConfigError, require
from perpneg3d.evaluation.janus import outcome
from perpneg3d.gallery import write_gallery
from perpneg3d.images import make_grid, save_png
from perpneg3d.renderer.orbit import render_rgb
from perpneg3d.saved_config import is_safe, leaves
from perpneg3d.training.run_loading import load_run

ROOT = Path(__file__).resolve().parents[1]
COLUMNS = ["method", "object", "seed", "front_share", "view_acc", "view_acc_aligned", "object_acc", "janus_free", "oriented",
           "seconds_per_step", "run"]


def wilson(k: int, n: int) -> tuple[float, float]:
    """95% Wilson score interval of k successes in n trials (scipy.stats.binomtest)."""
    if n == 0:
        return 0.0, 1.0
    ci = binomtest(k, n).proportion_ci(0.95, method="wilson")
    return float(ci.low), float(ci.high)


def run_dir(out: Path, method: str, obj: str, seed: int) -> Path:
    return out / method / obj / str(seed)


def launch(out: Path, method: str, obj: str, seeds: list[int], overrides: list[str], launcher: str) -> None:
    """One Hydra sweep over the seeds still missing for (method, object)."""
    sweep = out / method / obj
    args = [sys.executable, str(ROOT / "train.py"), "-m", f"seed={','.join(map(str, seeds))}", f'prompt="a toy {obj}"',
            *overrides, f"hydra.sweep.dir={sweep}", "hydra.sweep.subdir=${seed}"]
    if launcher != "basic":
        args.append(f"hydra/launcher={launcher}")
    print(f"{method} / {obj}: seeds {seeds} ({launcher})", flush=True)
    done = subprocess.run(args, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["?"])[-1]
        raise ConfigError(f"the {method} runs of '{obj}' failed ({tail}): see {sweep}")


def run_overrides(obj: str, seed: int, overrides: list[str]) -> list[str]:
    """The train.py overrides of one benchmark run (launch() gives the same, as a sweep)."""
    return [f"seed={seed}", f'prompt="a toy {obj}"', *overrides]


def check_reusable(folder: Path, method: str, overrides: list[str]) -> None:
    """A run folder left by an earlier benchmark is reused (finished) or resumed (interrupted) only if
    it was made with what the method now asks for; else ConfigError naming the first difference."""
    saved_path = folder / "config.yaml"
    if not saved_path.is_file():
        return
    saved = leaves(OmegaConf.load(saved_path))
    wanted = leaves(compose_config("train", overrides))
    changed = sorted(k for k, v in wanted.items() if k in saved and saved[k] != v and not is_safe(k))
    if changed:
        k = changed[0]
        raise ConfigError(f"{folder} was trained with {k}={saved[k]!r}, but method {method} now sets {k}={wanted[k]!r}: "
                          f"move or delete that folder, or use another out_dir")


def row(out: Path, method: str, obj: str, seed: int) -> dict:
    folder = run_dir(out, method, obj, seed)
    metrics = json.loads((folder / "metrics.json").read_text())
    janus = metrics["janus"]
    return dict(method=method, object=obj, seed=seed, front_share=janus["front_share"], view_acc=janus["view_acc"],
                view_acc_aligned=janus["view_acc_aligned"], object_acc=janus["object_acc"], **outcome(janus),
                seconds_per_step=metrics["seconds_per_step"], run=str(folder))


def summary(rows: list[dict], methods: list[str], baseline: str | None) -> list[dict]:
    """Per method: counts with Wilson intervals, mean step time, and the paired comparison with the
    baseline on the same (object, seed): runs it fixes (baseline fails, method succeeds) and breaks."""
    by_key = {(r["method"], r["object"], r["seed"]): r for r in rows}
    out = []
    for m in methods:
        mine = [r for r in rows if r["method"] == m]
        n = len(mine)
        entry = dict(method=m, n=n, seconds_per_step=sum(r["seconds_per_step"] for r in mine) / max(n, 1))
        for key in ("janus_free", "oriented"):
            k = sum(r[key] for r in mine)
            entry[key] = k
            entry[f"{key}_ci"] = wilson(k, n)
            if baseline is not None and m != baseline:
                pairs = [(by_key[(baseline, r["object"], r["seed"])][key], r[key]) for r in mine
                         if (baseline, r["object"], r["seed"]) in by_key]
                entry[f"{key}_fixes"] = sum(1 for b, x in pairs if x and not b)
                entry[f"{key}_breaks"] = sum(1 for b, x in pairs if b and not x)
        out.append(entry)
    return out


def markdown(rows: list[dict], summ: list[dict], baseline: str | None) -> str:
    lines = ["| method | Janus-free (95% CI) | correctly oriented (95% CI) | vs " + (baseline or "-") +
             ": fixes / breaks (oriented) | s/step |", "|---|---|---|---|---|"]
    for s in summ:
        lo, hi = s["janus_free_ci"]
        olo, ohi = s["oriented_ci"]
        paired = f"{s['oriented_fixes']} / {s['oriented_breaks']}" if "oriented_fixes" in s else "-"
        lines.append(f"| {s['method']} | {s['janus_free']}/{s['n']} ({lo:.2f}-{hi:.2f}) | "
                     f"{s['oriented']}/{s['n']} ({olo:.2f}-{ohi:.2f}) | {paired} | {s['seconds_per_step']:.3f} |")
    lines += ["", "| method | object | seed | front_share | view_acc | view_acc_aligned | object_acc | Janus-free | "
              "oriented |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['object']} | {r['seed']} | {r['front_share']:.2f} | {r['view_acc']:.2f} | "
                     f"{r['view_acc_aligned']:.2f} | {r['object_acc']:.2f} | {'yes' if r['janus_free'] else 'no'} | "
                     f"{'yes' if r['oriented'] else 'no'} |")
    return "\n".join(lines)


MONTAGE_AZIMUTHS = (0.0, 90.0, 180.0, -90.0)  # front, one side, back, the other side (elevation 15)


def montage(rows: list[dict], methods: list[str], path: Path) -> None:
    """Four rows per method, its runs seen from azimuth 0, 90, 180 and -90 (elevation 15); a column per run."""
    tiles = []
    azimuth = torch.tensor(MONTAGE_AZIMUTHS)
    for m in methods:
        renders = []
        for r in (r for r in rows if r["method"] == m):
            cfg, geometry, renderer, cameras, _, _ = load_run(r["run"])
            res = cfg.guidance.denoiser.get("dataset", {}).get("resolution", 64)
            renders.append(render_rgb(geometry, renderer, azimuth, torch.full_like(azimuth, 15.0),
                                      *cameras.middle(), res))
        tiles += [torch.stack([x[i] for x in renders]) for i in range(len(MONTAGE_AZIMUTHS))]
    ncol = tiles[0].shape[0]
    save_png(make_grid(torch.cat(tiles), nrow=ncol, upscale=max(1, 32 // tiles[0].shape[-1])), path)


def prepare(cfg) -> tuple[Path, list[str], list[int]]:
    """(out_dir made, objects, seeds) of a benchmark's config, its launcher checked (bench_refine.py shares it)."""
    require(cfg.launcher in ("basic", "submitit_local", "submitit_slurm"),
            f"launcher={cfg.launcher!r}: use basic, submitit_local or submitit_slurm")
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return out, list(cfg.objects), [int(s) for s in cfg.seeds]


def world_overrides(world) -> list[str]:
    """The train.py override that makes the toy prior's world these objects (none: the preset's world)."""
    return [] if not world else ["guidance.denoiser.dataset.objects=[" + ",".join(f'"{o}"' for o in world) + "]"]


def method_run_overrides(shared: list[str], method: list[str]) -> list[str]:
    """A method's train.py overrides after the shared ones; a config group the method names itself (its key before
    "=", e.g. experiment=toy_gs) replaces the shared choice of that group, which Hydra would refuse twice."""
    own = {o.split("=", 1)[0] for o in method if "=" in o and "." not in o.split("=", 1)[0].lstrip("+~")}
    return [o for o in shared if o.split("=", 1)[0] not in own] + method


def main(cfg) -> None:
    methods = list(cfg.methods)
    unknown = [m for m in methods if m not in cfg.method_overrides]
    require(not unknown, f"methods={methods}: {unknown} not in method_overrides ({', '.join(cfg.method_overrides)})")
    out, objects, seeds = prepare(cfg)
    for m in methods:
        for obj in objects:
            overrides = method_run_overrides(list(cfg.overrides) + world_overrides(cfg.world),
                                             list(cfg.method_overrides[m]))
            for s in seeds:
                check_reusable(run_dir(out, m, obj, s), m, run_overrides(obj, s, overrides))
            missing = [s for s in seeds if not (run_dir(out, m, obj, s) / "metrics.json").is_file()]
            if missing:
                launch(out, m, obj, missing, overrides, cfg.launcher)
            else:
                print(f"{m} / {obj}: all {len(seeds)} runs reused", flush=True)
            unfinished = [s for s in missing if not (run_dir(out, m, obj, s) / "metrics.json").is_file()]
            require(not unfinished, f"the {m} runs of '{obj}' with seeds {unfinished} did not finish (no metrics.json in "
                                    f"{run_dir(out, m, obj, unfinished[0]) if unfinished else ''}): see the job logs "
                                    f"under {out / m / obj}, then re-run the benchmark to resume them")
    rows = [row(out, m, obj, s) for m in methods for obj in objects for s in seeds]
    baseline = cfg.baseline if cfg.baseline in methods else None
    summ = summary(rows, methods, baseline)
    text = markdown(rows, summ, baseline)
    print(text)
    (out / "bench.md").write_text(text + "\n")
    with open(out / "bench.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    (out / "bench.json").write_text(json.dumps(dict(summary=summ, rows=rows, config=OmegaConf.to_container(cfg)),
                                               indent=2))
    montage(rows, methods, out / "montage.png")
    print(f"wrote bench.md, bench.csv, bench.json and montage.png to {out}")
    print(f"gallery: {write_gallery(out)}")  # every run to look at, bench.md on top


if __name__ == "__main__":
    run_script("bench_janus", main)
