import os
import sys
import tempfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# the toy world's renders and classifier references are cached here, once per test session: one folder for all of
# pytest-xdist's workers (named by the run's id), where the first worker to need a file builds it and the other
# waits for it (toy.dataset.cached_or_built)
_run = os.environ.get("PYTEST_XDIST_TESTRUNUID")
if _run:
    _cache = Path(tempfile.gettempdir()) / f"perpneg3d-test-cache-{_run}"
    _cache.mkdir(exist_ok=True)
    os.environ.setdefault("PERPNEG3D_CACHE", str(_cache))
else:
    os.environ.setdefault("PERPNEG3D_CACHE", tempfile.mkdtemp(prefix="perpneg3d-test-cache-"))
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


# the files that take longest (seconds of one worker, measured on the 2-core machine), handed out first so that
# `make test`'s two workers finish together (longest first); pytest-xdist's own reordering is off in the Makefile
# (--no-loadscope-reorder: it would order the files by their number of tests)
LONGEST_FILES = ("test_readme", "test_refine", "test_cli", "test_gpu_check", "test_trust", "test_scripts",
                 "test_fault_tolerance", "test_resume", "test_toy", "test_bench_janus", "test_deepfloyd_if", "test_sweep",
                 "test_mvdream_convert", "test_gaussians")


def pytest_collection_modifyitems(config, items):
    """The tests marked slurm first: they mostly wait on the local cluster's jobs, so the other worker runs beside
    them; then the longest files (LONGEST_FILES, in that order); then the rest as collected (a stable sort)."""
    def rank(item):
        name = item.path.stem
        longest = LONGEST_FILES.index(name) if name in LONGEST_FILES else len(LONGEST_FILES)
        return item.get_closest_marker("slurm") is None, longest

    items.sort(key=rank)


@pytest.fixture(scope="session")
def tiny_sd_path(tmp_path_factory) -> Path:
    """A tiny random Stable Diffusion folder, built once per test session."""
    from tiny_sd import build_tiny_sd

    return build_tiny_sd(tmp_path_factory.mktemp("tiny_sd"))


@pytest.fixture(scope="session")
def tiny_sd(tiny_sd_path):
    """The tiny folder loaded through perpneg3d's StableDiffusion (the users' code path)."""
    from perpneg3d.guidance.stable_diffusion import StableDiffusion

    return StableDiffusion(str(tiny_sd_path), device="cpu")


@pytest.fixture(scope="session")
def tiny_if_path(tmp_path_factory) -> Path:
    """A tiny random DeepFloyd IF stage I folder, built once per test session."""
    from tiny_if import build_tiny_if

    return build_tiny_if(tmp_path_factory.mktemp("tiny_if"))


@pytest.fixture(scope="session")
def tiny_if(tiny_if_path):
    """The tiny IF loaded through perpneg3d's DeepFloydIF (the users' code path), without channels_last so
    that its numbers equal diffusers' IFPipeline bit for bit."""
    from perpneg3d.guidance.deepfloyd_if import DeepFloydIF

    return DeepFloydIF(str(tiny_if_path), device="cpu", channels_last=False)
