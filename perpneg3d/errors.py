"""User-facing errors: each carries one line that names the bad value and the fix."""
from __future__ import annotations

import contextlib
import sys


class PerpNegError(Exception):
    """A user mistake or an unusable input; entry points print its message alone, no traceback."""


class ConfigError(PerpNegError, ValueError):
    """A configuration value is invalid."""


class ModelNotFoundError(PerpNegError):
    """Pretrained weights could not be found or loaded."""


class CheckpointError(PerpNegError):
    """A checkpoint is missing, truncated or unreadable."""


class OutputDirError(PerpNegError):
    """The output folder cannot be created or written."""


class ExportError(ConfigError):
    """A mesh export cannot run or failed; `overrides` are the export.* settings that would fix it."""

    def __init__(self, message: str, overrides: tuple[str, ...] = ()):
        super().__init__(message)
        self.overrides = tuple(overrides)


class NumericalError(PerpNegError):
    """Training produced non-finite values for too many consecutive steps."""


def first_line(err: BaseException, limit: int | None = None) -> str:
    """An exception's first message line (at most `limit` characters), or its type's name when empty."""
    text = str(err).strip()
    return text.splitlines()[0][:limit] if text else type(err).__name__


def require(condition: bool, message: str) -> None:
    """Raise ConfigError(message) unless condition holds."""
    if not condition:
        raise ConfigError(message)


INTERRUPTED_EXIT_CODE = 130  # 128 + SIGINT, what shells report for Ctrl-C


def _exit_interrupted(signum, frame) -> None:
    print("interrupted (Ctrl-C)", file=sys.stderr)
    sys.exit(INTERRUPTED_EXIT_CODE)


def quiet_ctrl_c() -> None:
    """Make Ctrl-C exit with one line and code 130 from now on, before the heavy imports of an entry
    point (torch alone takes seconds); the training loop installs its own checkpointing handler."""
    import signal

    signal.signal(signal.SIGINT, _exit_interrupted)


@contextlib.contextmanager
def reported_errors(exit_code: int = 2):
    """Turn a PerpNegError into one line on stderr and a non-zero exit, and Ctrl-C into one line and
    exit code 130 (for scripts): a user's mistake or interruption never prints a traceback."""
    try:
        yield
    except PerpNegError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(exit_code)
    except KeyboardInterrupt:
        print("interrupted (Ctrl-C)", file=sys.stderr)
        sys.exit(INTERRUPTED_EXIT_CODE)
