"""Run folders that never collide: outputs/<name>/<timestamp>[-N]/."""
from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
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


@contextlib.contextmanager
def atomic_file(path: Path, mode: str = "w"):
    """Open a temporary file beside `path` for writing; on a clean exit fsync it and rename it over `path`,
    so a reader (or a kill at any moment) sees the old file or the whole new one, never a truncated one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, mode) as f:
        yield f
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_atomic(path: Path, text: str) -> None:
    """Replace `path` with `text` atomically (atomic_file)."""
    with atomic_file(path) as f:
        f.write(text)


class RunLock:
    """One process at a time per run folder: an exclusive flock on <run>/.lock, held until release()
    (or the process's end, whatever kills it, so a requeued job never finds a stale lock)."""

    def __init__(self):
        self._file = None

    def acquire(self, run_dir: Path) -> None:
        path = Path(run_dir) / ".lock"
        f = open(path, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "?"
            f.close()
            raise OutputDirError(f"run folder {run_dir} is in use by another process (pid {holder}): wait for it to "
                                 "end or stop it, then resume") from None
        f.seek(0)
        f.truncate()
        f.write(str(os.getpid()))
        f.flush()
        self.release()
        self._file = f

    def release(self) -> None:
        if self._file is not None:
            self._file.close()  # closing the descriptor drops the flock
            self._file = None

    def __enter__(self) -> "RunLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()
