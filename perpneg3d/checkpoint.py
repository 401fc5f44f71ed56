"""Checkpoints that survive kill -9: temporary file, fsync, atomic rename; newest valid one wins."""
from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import torch

from perpneg3d.errors import CheckpointError, first_line
from perpneg3d.run_dir import atomic_file

log = logging.getLogger(__name__)
CKPT_FORMAT = "perpneg3d-ckpt-1"
CKPT_NAME = re.compile(r"^step_(\d+)\.ckpt$")
REQUIRED_KEYS = ("format", "step", "geometry", "renderer", "optimizer", "generator")


def checkpoint_path(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / "ckpts" / f"step_{step:07d}.ckpt"


def save_checkpoint(state: dict, path: Path) -> Path:
    """Write atomically: a reader sees the old file or the complete new one, never a partial one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path, "wb") as f:
        torch.save(dict(state, format=CKPT_FORMAT), f)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return path


def load_checkpoint(path: Path) -> dict:
    """Load and validate; a missing, truncated or foreign file raises CheckpointError (one line)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist: pass a run folder or a file from its ckpts/")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        reason = first_line(err, 120)
        raise CheckpointError(f"checkpoint {path} is unreadable ({reason}): resume from another file in "
                              f"{path.parent} or start a new run without resume=") from None
    if not isinstance(state, dict) or state.get("format") != CKPT_FORMAT or any(k not in state for k in REQUIRED_KEYS):
        raise CheckpointError(f"checkpoint {path} is not a perpneg3d checkpoint: resume from a file written by train.py")
    return state


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Checkpoints of a run, newest step first (temporary files are ignored)."""
    folder = Path(run_dir) / "ckpts"
    found = [(int(m.group(1)), p) for p in folder.glob("step_*.ckpt") if (m := CKPT_NAME.match(p.name))]
    return [p for _, p in sorted(found, reverse=True)]


def latest_valid_checkpoint(run_dir: Path) -> tuple[Path, dict] | None:
    """The newest checkpoint that loads; corrupt ones are skipped with a warning."""
    for path in list_checkpoints(run_dir):
        try:
            return path, load_checkpoint(path)
        except CheckpointError as err:
            log.warning("skipping %s", err)
    return None


def prune_checkpoints(run_dir: Path, keep: int) -> None:
    """Delete all but the newest `keep` checkpoints, and temporary files a killed writer left behind
    (one writer per run folder: any temporary file not of this process is stale)."""
    for path in list_checkpoints(run_dir)[max(keep, 1):]:
        path.unlink(missing_ok=True)
    for tmp in (Path(run_dir) / "ckpts").glob(".step_*.ckpt.tmp*"):
        if not tmp.name.endswith(f".tmp{os.getpid()}"):
            tmp.unlink(missing_ok=True)


def resolve_resume(resume: str) -> tuple[Path, Path, dict]:
    """resume= a run folder (newest valid checkpoint) or a checkpoint file -> (run_dir, path, state)."""
    target = Path(resume).expanduser()
    if target.is_dir():
        found = latest_valid_checkpoint(target)
        if found is None:
            raise CheckpointError(f"resume={resume}: no readable checkpoint in {target / 'ckpts'}: check the folder or start a new run")
        return target, found[0], found[1]
    return run_dir_of(resume), target, load_checkpoint(target)


def run_dir_of(resume: str) -> Path:
    """The run folder that resume= names: the folder itself, or the run a checkpoint file belongs to."""
    target = Path(resume).expanduser()
    if target.is_dir():
        return target
    return target.parent.parent if target.parent.name == "ckpts" else target.parent


def set_aside_later(run_dir: Path, step: int) -> Path | None:
    """Resuming from an older checkpoint starts a new history at `step`: the later checkpoints and
    validation images of the abandoned one are moved (never deleted) into
    <run>/abandoned/step_<step>_<time>/, so pruning and a later resume=<run> see one continuous
    history. Returns that folder, or None when nothing was later."""
    import datetime as _dt
    import shutil

    run_dir = Path(run_dir)
    later = [p for p in list_checkpoints(run_dir) if int(CKPT_NAME.match(p.name).group(1)) > step]
    later += [p for p in (run_dir / "val").glob("step_*.png") if p.stem[5:].isdigit() and int(p.stem[5:]) > step]
    if not later:
        return None
    stamp = _dt.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    dest = run_dir / "abandoned" / f"step_{step:07d}_{stamp}"
    for path in later:
        target = dest / path.parent.name / path.name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(path), str(target))
    return dest
