"""A gallery of runs to look at: PATH/gallery/index.html, one self-contained folder (relative links only, no
server, no network), for one run, a sweep or a benchmark folder.

One card per run (turntable video with its poster frame, last validation grid, Janus strip, the run's overrides
against the others' common config, metrics, links to mesh.glb, config.yaml and the TensorBoard folder), the
refine stage beside its coarse run where there is one (<run>/refine), a table of the same runs sortable by any
column and filterable by the values that differ between runs, and a benchmark's summary (its bench.md, or a
sweep's sweep.md) on top.
An artefact a run lacks is said in words, never shown as a broken image.
"""
from __future__ import annotations

import html
import json
import logging
import os
import re
import shutil
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import OmegaConf

from perpneg3d.errors import ConfigError, first_line
from perpneg3d.saved_config import leaves

log = logging.getLogger(__name__)

SKIP_DIRS = {"gallery", ".gallery.new", ".gallery.old", "ckpts", "val", "tb", "abandoned", ".submitit", ".hydra"}
NOT_OVERRIDES = ("out_dir", "resume", "refine")  # paths, not choices (refine_overrides and the rest are)
COPIED = ("turntable.mp4", "turntable.png", "janus_strip.png", "mesh.glb", "config.yaml", "metrics.json")
MISSING = {
    "turntable.mp4": "no turntable video (the run has not finished: the turntable is rendered at its end)",
    "val": "no validation grid yet (trainer.val_every was not reached)",
    "janus_strip.png": "no Janus strip (evaluate_janus found no view classifier for this prior)",
    "mesh.glb": "no mesh.glb (export off, or not reached)",
}
COLUMNS = ("front_share", "view_acc_aligned", "janus_free", "ms_per_step", "steps", "faces")


@dataclass
class Run:
    folder: Path
    name: str                                   # its path under the gallery's root ("." for the root itself)
    config: dict = field(default_factory=dict)  # dotted leaves of config.yaml
    metrics: dict = field(default_factory=dict)
    stage: "Run | None" = None                  # the refine stage in <run>/refine

    @cached_property
    def figures(self) -> dict:
        """The table's columns for this run (mesh.glb is read once)."""
        janus = self.metrics.get("janus") or {}
        steps = self.metrics.get("steps")
        sps = self.metrics.get("seconds_per_step")
        return dict(front_share=janus.get("front_share"), view_acc_aligned=janus.get("view_acc_aligned"),
                    janus_free=janus.get("janus_free"), ms_per_step=None if sps is None else round(sps * 1000, 1),
                    steps=steps, faces=mesh_faces(self.folder / "mesh.glb"))


def mesh_faces(path: Path) -> int | None:
    if not path.is_file():
        return None
    import trimesh

    scene = trimesh.load(path, force="scene")
    return int(sum(len(g.faces) for g in scene.geometry.values()))


def read_run(folder: Path, root: Path) -> Run:
    cfg = OmegaConf.load(folder / "config.yaml")
    metrics = folder / "metrics.json"
    return Run(folder, str(folder.relative_to(root)) if folder != root else ".", leaves(cfg),
               json.loads(metrics.read_text()) if metrics.is_file() else {})


def find_runs(root: Path) -> list[Run]:
    """Every run folder (a folder with config.yaml) under root, root included, in path order; a run's
    refine/ folder is attached to it as its stage."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS)
        folder = Path(dirpath)
        if "config.yaml" in filenames and not (folder.name == "refine" and (folder.parent / "config.yaml").is_file()):
            run = read_run(folder, root)
            if (folder / "refine" / "config.yaml").is_file():
                run.stage = read_run(folder / "refine", root)
            found.append(run)
    return sorted(found, key=lambda r: [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in r.name.split("/")])


def varying(runs: list[Run]) -> list[str]:
    """The config keys whose values differ between the runs (their overrides against the common config)."""
    keys = sorted({k for r in runs for k in r.config})
    out = []
    for k in keys:
        if k in NOT_OVERRIDES:  # leaves() has already dropped hydra's own keys
            continue
        if len({json.dumps(r.config.get(k), sort_keys=True) for r in runs}) > 1:
            out.append(k)
    return out


def _copy(src: Path, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dest)  # same file system: no copy
    except OSError:
        shutil.copy2(src, dest)


def _media(run: Run, target: Path) -> dict[str, str]:
    """Copy the run's files into the gallery (target) and return name -> relative path."""
    have = {}
    for name in COPIED:
        if (run.folder / name).is_file():
            _copy(run.folder / name, target / name)
            have[name] = f"{target.parent.name}/{target.name}/{name}"
    grids = sorted((run.folder / "val").glob("step_*.png"), key=lambda p: int(re.sub(r"\D", "", p.stem) or 0))
    if grids:
        _copy(grids[-1], target / "val.png")
        have["val"] = f"{target.parent.name}/{target.name}/val.png"
    return have


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def _stage_html(run: Run, media: dict, title: str, tb_link: str) -> str:
    esc = html.escape
    parts = [f"<div class='stage'><h3>{esc(title)}</h3>"]
    if "turntable.mp4" in media:
        poster = f" poster='{esc(media['turntable.png'])}'" if "turntable.png" in media else ""
        parts.append(f"<video controls muted loop playsinline preload='auto'{poster} src='{esc(media['turntable.mp4'])}'>"
                     "</video>")
    else:
        parts.append(f"<p class='missing'>{MISSING['turntable.mp4']}</p>")
    for key, alt in (("val", "last validation grid"), ("janus_strip.png", "Janus strip")):
        parts.append(f"<img alt='{alt}' src='{esc(media[key])}'>" if key in media
                     else f"<p class='missing'>{MISSING[key]}</p>")
    row = run.figures
    parts.append("<dl>" + "".join(f"<dt>{c}</dt><dd>{_fmt(row[c])}</dd>" for c in COLUMNS) + "</dl>")
    links = [f"<a href='{esc(media[n])}'>{n}</a>" for n in ("mesh.glb", "config.yaml", "metrics.json") if n in media]
    if "mesh.glb" not in media:
        links.append(f"<span class='missing'>{MISSING['mesh.glb']}</span>")
    links.append(f"<a href='{esc(tb_link)}'>TensorBoard folder</a>")
    parts.append("<p class='links'>" + " · ".join(links) + "</p></div>")
    return "".join(parts)


def markdown_tables(text: str) -> str:
    """A benchmark's bench.md as HTML: its pipe tables as tables, other non-empty lines as paragraphs."""
    out, rows = [], []

    def flush():
        if rows:
            head, body = rows[0], [r for r in rows[1:] if not set("".join(r)) <= set("-: ")]
            out.append("<table class='summary'><tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in head) + "</tr>"
                       + "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in body)
                       + "</table>")
            rows.clear()

    for line in text.splitlines():
        if line.strip().startswith("|"):
            rows.append([c.strip() for c in line.strip().strip("|").split("|")])
            continue
        flush()
        if line.strip():
            out.append(f"<p>{html.escape(line.strip().lstrip('#').strip())}</p>")
    flush()
    return "\n".join(out)


def write_gallery(root: str | Path) -> Path:
    """Write <root>/gallery/index.html (and its media) for the runs under root; returns the page's path. The
    previous gallery is replaced only once the new one is complete."""
    root = Path(root).expanduser().resolve()
    if not root.is_dir():
        raise ConfigError(f"gallery: {root} is not a folder: pass a run, sweep or benchmark folder")
    runs = find_runs(root)
    if not runs:
        raise ConfigError(f"gallery: no run under {root} (no config.yaml): pass a folder written by train.py")
    building = root / ".gallery.new"
    shutil.rmtree(building, ignore_errors=True)
    keys = varying(runs)  # a refine stage differs from its run by design: not a choice
    staged = any(r.stage for r in runs)  # the table then shows the refined stage's figures too
    esc = html.escape
    cards, rows = [], []
    for i, run in enumerate(runs):
        media = _media(run, building / "runs" / str(i))
        stage_media = _media(run.stage, building / "runs" / f"{i}r") if run.stage else {}
        values = {k: _fmt(run.config.get(k)) for k in keys}
        attrs = " ".join(f"data-f{j}='{esc(v)}'" for j, v in enumerate(values.values()))
        overrides = "".join(f"<li>{esc(k)}={esc(v)}</li>" for k, v in values.items()) or "<li>none: one run</li>"
        tb = lambda r: os.path.relpath(r.folder / "tb", root / "gallery")  # noqa: E731  the run's own TensorBoard events
        body = _stage_html(run, media, "coarse" if run.stage else "run", tb(run))
        if run.stage:
            body += _stage_html(run.stage, stage_media, "refined", tb(run.stage))
        cards.append(f"<section class='card' id='run{i}' {attrs}><h2>{esc(run.name)}</h2><ul class='overrides'>"
                     f"{overrides}</ul><div class='stages'>{body}</div></section>")
        refined = list(run.stage.figures.values()) if run.stage else [None] * len(COLUMNS)
        shown = list(run.figures.values()) + refined * staged
        cells = [f"<td data-v='{esc(run.name)}'><a href='#run{i}'>{esc(run.name)}</a></td>"]
        cells += [f"<td data-v='{esc(v)}'>{esc(v)}</td>" for v in (*values.values(), *map(_fmt, shown))]
        rows.append(f"<tr {attrs}>{''.join(cells)}</tr>")
    filters = "".join(
        f"<label>{esc(k)} <select data-f='{j}'><option value=''>all</option>"
        + "".join(f"<option>{esc(v)}</option>" for v in sorted({_fmt(r.config.get(k)) for r in runs}))
        + "</select></label>" for j, k in enumerate(keys))
    table = next((root / n for n in ("bench.md", "sweep.md") if (root / n).is_file()), None)
    summary = markdown_tables(table.read_text()) if table else ""
    columns = ("run", *keys, *COLUMNS, *(f"refined {c}" for c in COLUMNS * staged))
    header = "".join(f"<th>{esc(c)}</th>" for c in columns)
    page = PAGE.format(title=esc(root.name), count=len(runs), summary=summary, filters=filters, header=header,
                       rows="\n".join(rows), cards="\n".join(cards), script=SCRIPT)
    (building / "index.html").write_text(page)
    target, old = root / "gallery", root / ".gallery.old"
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        target.rename(old)
    building.rename(target)
    shutil.rmtree(old, ignore_errors=True)
    return target / "index.html"


class SweepGallery(Callback):
    """Hydra callback (configs/train.yaml, hydra.callbacks): the sweep's gallery once every job has ended. A
    gallery that cannot be written is one logged line, never a failed sweep."""

    def on_multirun_end(self, config, **kwargs) -> None:
        try:
            print(f"gallery: {write_gallery(config.hydra.sweep.dir)}", flush=True)
        except Exception as err:  # noqa: BLE001  the sweep's results stand without their page
            log.warning("the sweep's gallery was not written: %s (python scripts/gallery.py <sweep folder>)",
                        first_line(err))


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title}: perpneg3d gallery</title>
<style>
body {{ font-family: sans-serif; margin: 1em; background: #fafafa; }}
table {{ border-collapse: collapse; margin: 0.5em 0; }} td, th {{ border: 1px solid #ccc; padding: 2px 6px; }}
#runs th {{ cursor: pointer; background: #eee; }} .card {{ border: 1px solid #bbb; background: white; margin: 1em 0;
padding: 0.5em; }} .stages {{ display: flex; gap: 1em; flex-wrap: wrap; }} .stage img, .stage video {{ display: block;
max-width: 420px; margin: 4px 0; }} .missing {{ color: #a33; font-style: italic; }} dl {{ display: grid;
grid-template-columns: auto auto; gap: 0 1em; }} dt {{ color: #555; }} .hidden {{ display: none; }}
</style></head><body>
<h1>{title}: {count} runs</h1>
{summary}
<div id="filters">{filters}</div>
<table id="runs"><thead><tr>{header}</tr></thead><tbody>
{rows}
</tbody></table>
{cards}
<script>{script}</script>
</body></html>
"""

SCRIPT = """
const body = document.querySelector('#runs tbody');
document.querySelectorAll('#runs th').forEach((th, col) => th.addEventListener('click', () => {
  const up = th.dataset.dir !== 'up';
  document.querySelectorAll('#runs th').forEach(h => delete h.dataset.dir);
  th.dataset.dir = up ? 'up' : 'down';
  const key = r => r.children[col].dataset.v;
  const rows = Array.from(body.rows).sort((a, b) => {
    const x = key(a), y = key(b), nx = parseFloat(x), ny = parseFloat(y);
    const c = (!isNaN(nx) && !isNaN(ny)) ? nx - ny : x.localeCompare(y, undefined, {numeric: true});
    return up ? c : -c;
  });
  rows.forEach(r => body.appendChild(r));
}));
document.querySelectorAll('#filters select').forEach(sel => sel.addEventListener('change', () => {
  const wanted = Array.from(document.querySelectorAll('#filters select')).map(s => [s.dataset.f, s.value]);
  document.querySelectorAll('#runs tbody tr, section.card').forEach(el => {
    const show = wanted.every(([f, v]) => v === '' || el.dataset['f' + f] === v);
    el.classList.toggle('hidden', !show);
  });
}));
"""
