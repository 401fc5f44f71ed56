"""2D view fidelity (the paper's Table 1): share of samples showing the requested object and view."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import torch
from tqdm.auto import tqdm

from perpneg3d.guidance.ddim_sampler import sample
from perpneg3d.images import make_grid, save_png
from perpneg3d.prompts.views import VIEW_NEGATIVES, VIEWS, view_prompt


@dataclass
class CellResult:
    view: str
    mode: str
    weight: float
    n: int
    success: float  # share with the requested object in the requested view
    stderr: float
    view_shares: dict  # share of samples per predicted label (front/side/back/none)
    grid: str
    neg_time_ramp: tuple | None = None  # adaptive weights (docs/method.md); None / False: the paper's
    alignment: bool = False
    emphasis: float = 1.0  # score-space view emphasis (docs/method.md); 1: none

    @property
    def method(self) -> str:
        name = self.mode if self.mode in ("cfg", "negprompt") else f"{self.mode} w={self.weight:g}"
        if self.neg_time_ramp is not None:
            name += f" + t-ramp [{self.neg_time_ramp[0]:g}, {self.neg_time_ramp[1]:g}]"
        name += " + alignment" if self.alignment else ""
        return name + (f" + score emphasis {self.emphasis:g}" if self.emphasis != 1.0 else "")


def cell_texts(prompt: str, view: str, mode: str, emphasis: float = 1.0) -> list[str]:
    """[uncond, positive, negatives...] for the paper's view strategy; cfg uses no negatives; the prompt without
    view words last when the cell has score-space emphasis."""
    negatives = [] if mode == "cfg" else [view_prompt(prompt, v) for v in VIEW_NEGATIVES[view]]
    return ["", view_prompt(prompt, view)] + negatives + ([prompt] if emphasis != 1.0 else [])


def evaluate_cell(denoiser, classifier, prompt: str, view: str, mode: str, weight: float, num_samples: int,
                  batch_size: int, steps: int, scale: float, seed: int, out_dir: Path | None,
                  neg_time_ramp: tuple | None = None, alignment: bool = False, emphasis: float = 1.0) -> CellResult:
    texts = cell_texts(prompt, view, mode, emphasis)
    emb = denoiser.embed(texts)
    weights = torch.full((len(texts) - 2 - int(emphasis != 1.0),), float(weight))
    generator = torch.Generator().manual_seed(seed)
    images = torch.cat([
        sample(denoiser, emb, weights, min(batch_size, num_samples - start), scale=scale, mode=mode, steps=steps,
               generator=generator, progress=False, neg_time_ramp=neg_time_ramp, alignment=alignment,
               emphasis=emphasis).cpu()
        for start in range(0, num_samples, batch_size)
    ])
    pred = classifier(images)
    target_obj = classifier.object_index(prompt)
    ok = (pred.object_idx == target_obj) & (pred.view_idx == VIEWS.index(view))
    p = ok.float().mean().item()
    shares = {v: ((pred.object_idx == target_obj) & (pred.view_idx == i)).float().mean().item() for i, v in enumerate(VIEWS[:3])}
    shares["other"] = 1 - sum(shares.values())
    grid = ""
    if out_dir is not None:
        tag = ("_ramp" if neg_time_ramp is not None else "") + ("_align" if alignment else "")
        tag += f"_emph{emphasis:g}" if emphasis != 1.0 else ""
        grid = str(save_png(make_grid(images[:64], 8, upscale=max(1, 128 // images.shape[-1])),
                            out_dir / f"{view}_{mode}_w{weight:g}{tag}.png"))
    return CellResult(view, mode, float(weight), num_samples, p, math.sqrt(max(p * (1 - p), 1e-12) / num_samples), shares,
                      grid, tuple(neg_time_ramp) if neg_time_ramp is not None else None, bool(alignment),
                      float(emphasis))


def evaluate_view_fidelity(denoiser, classifier, prompt: str, views: Sequence[str], methods: Sequence[dict],
                           num_samples: int = 200, batch_size: int = 200, steps: int = 50, scale: float = 7.5,
                           seed: int = 0, out_dir: Path | None = None) -> list[CellResult]:
    """Every (view, method) cell with the same seed, so methods see the same initial noise."""
    cells = [(v, m) for v in views for m in methods]
    results = []
    bar = tqdm(cells, desc="view fidelity")
    for view, m in bar:
        mode, weight = m["mode"], float(m.get("weight", 0.0))
        bar.set_postfix_str(f"{view} {mode} w={weight:g}")
        results.append(evaluate_cell(denoiser, classifier, prompt, view, mode, weight, num_samples, batch_size,
                                     steps, scale, seed, out_dir, m.get("neg_time_ramp"), bool(m.get("alignment", False)),
                                     float(m.get("emphasis", 1.0))))
    return results


def markdown_table(results: Sequence[CellResult], views: Sequence[str]) -> str:
    """Rows: methods; columns: views; cells 'success% ± stderr%' (the paper's Table 1 shape)."""
    methods = list(dict.fromkeys(r.method for r in results))
    lines = ["| method | " + " | ".join(f"{v} view" for v in views) + " |", "|---" * (len(views) + 1) + "|"]
    for m in methods:
        cells = []
        for v in views:
            r = next((r for r in results if r.method == m and r.view == v), None)
            cells.append(f"{100 * r.success:.1f}% ± {100 * r.stderr:.1f}" if r else "")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def to_json(results: Sequence[CellResult]) -> list[dict]:
    return [dict(asdict(r), method=r.method) for r in results]
