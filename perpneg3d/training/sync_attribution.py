"""Who makes each host<->device synchronisation of a CUDA training step (scripts/gpu_check.py, docs/gpu.md).

CUDA's sync debug mode warns at every synchronisation; sync_stacks() records the Python stack at that moment,
and classify_stack() names the owner from the whole stack (the file a warning names is torch's own for every
sync of the backward pass): nerfacc's sampler, the trainer's skip decision, a known sync of perpneg3d's with its
reason, autograd's engine, or perpneg3d's own.
"""
from __future__ import annotations

import inspect
import traceback
import warnings
from pathlib import Path

import torch


def marked_line(module, function, marker: str) -> tuple[str, int]:
    """(file name, line number) of the line of `function` (in `module`) whose text holds `marker`."""
    source, first = inspect.getsourcelines(function)
    offset = next(i for i, line in enumerate(source) if marker in line)
    return Path(module.__file__).name, first + offset


def skip_decision_line() -> tuple[str, int]:
    """trainer.py's line that reads the step's finiteness on the host (docs/gpu.md)."""
    from perpneg3d.training import trainer

    return marked_line(trainer, trainer.Trainer.train_step, "the step's one sync")


def known_syncs() -> dict[tuple[str, int], str]:
    """perpneg3d's synchronisations by design, each with its reason (docs/gpu.md): counted apart, not failures."""
    from perpneg3d.renderer import volume_renderer

    normals = marked_line(volume_renderer, volume_renderer.VolumeRenderer._render_rays,
                          "known sync: normals")
    return {normals: "normals pass (shading or trainer.lambda_orient): torch.nonzero picks the visible samples, "
                     "whose normals cost 6 density queries each (finite differences) or a double backward (analytic)"}


def classify_stack(stack: list[tuple[str, int]], skip_decision: tuple[str, int],
                   known: dict[tuple[str, int], str]) -> str:
    """Who makes a synchronisation, from the Python stack at the moment it happens (outermost frame first): nerfacc
    (its occupancy-grid sampler synchronises by design), the trainer's skip decision, a known sync of perpneg3d's
    (known_syncs), autograd's engine (a sync of the backward pass: torch replays it under its own files, so the
    forward op that asks for it is not on the stack), or perpneg3d's own."""
    names = [(Path(f).name, line) for f, line in stack]
    if any("/nerfacc/" in f.replace("\\", "/") for f, _ in stack):
        return "nerfacc"
    if skip_decision in names:
        return "skip_decision"
    if any(site in known for site in names):
        return "known"
    innermost = stack[-1][0].replace("\\", "/") if stack else ""
    if "/torch/" in innermost and "/autograd/" in innermost:
        return "backward"
    return "own"


def own_site(stack: list[tuple[str, int]]) -> str:
    """The innermost perpneg3d frame of a stack, as file:line (the line to look at), else the innermost frame."""
    ours = [(f, line) for f, line in stack if "/perpneg3d/" in f.replace("\\", "/")]
    f, line = (ours or stack or [("?", 0)])[-1]
    return f"{Path(f).name}:{line}"


def sync_stacks(fn) -> list[list[tuple[str, int]]]:
    """Run fn() under CUDA's sync debug mode; the Python stack (file, line; outermost first) of each synchronisation."""
    stacks = []

    def record(message, category, filename, lineno, file=None, line=None):
        if "synchroniz" in str(message):
            stacks.append([(f.filename, f.lineno) for f in traceback.extract_stack()[:-1]])

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return stacks
