"""Run folders that never collide: outputs/<name>/<timestamp>[-N]/."""
from __future__ import annotations

import datetime as _dt
import os
from pathlib import Path

from perpneg3d.errors import OutputDirError


def check_writable(folder: Path) -> None:
    """Raise OutputDirError unless `folder` can hold new files."""
    probe = folder / f".write_probe_{os.getpid()}"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise OutputDirError(f"output folder {folder} is not writable ({err.strerror}): choose another with out_dir=/path") from None


def new_run_dir(base: str | Path, timestamp: str | None = None) -> Path:
    """Create and return a fresh folder base/<timestamp>, adding -1, -2, ... if it already exists.

    mkdir without exist_ok is the atomic claim: two runs started in the same second get different folders.
    """
    base = Path(base).expanduser()
    stamp = timestamp or _dt.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    try:
        base.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OutputDirError(f"cannot create output folder {base} ({err.strerror}): choose another with out_dir=/path") from None
    check_writable(base)
    for suffix in range(10_000):
        candidate = base / (stamp if suffix == 0 else f"{stamp}-{suffix}")
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            continue
    raise OutputDirError(f"could not find a free run folder under {base}")
