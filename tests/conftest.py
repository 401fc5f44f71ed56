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


def pytest_collection_modifyitems(config, items):
    """The tests marked slurm first (a stable sort): they mostly wait on the local cluster's jobs, so under
    `make test`'s two workers the other files run beside them instead of after them."""
    items.sort(key=lambda item: item.get_closest_marker("slurm") is None)


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
