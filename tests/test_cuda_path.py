"""The CUDA path, checked on a CPU: nerfacc's kernel probe and build checks, the tcnn fallback, the
host-side level count, the random streams in checkpoints, the empty-marcher guard, the GPU make
targets and the CPU mode of scripts/gpu_check.py."""
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from helpers import subprocess_env
from perpneg3d.errors import ConfigError, PerpNegError
from perpneg3d.geometry import hash_grid
from perpneg3d.geometry.hash_grid import HashGridEncoding
from perpneg3d.random_streams import RandomStreams
from perpneg3d.renderer import nerfacc_cuda
from perpneg3d.renderer.volume_renderer import ensure_samples

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def fresh_probe():
    nerfacc_cuda.probe.cache_clear()
    nerfacc_cuda.available.cache_clear()
    yield
    nerfacc_cuda.probe.cache_clear()
    nerfacc_cuda.available.cache_clear()


def test_the_probe_imports_nerfacc_s_real_extension_module(tmp_path, monkeypatch):
    """nerfacc 0.5.3 keeps the kernels in nerfacc.cuda._backend._C (nerfacc.cuda._C does not exist):
    on a machine without the toolkit's headers or a GPU the module imports and says None."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    with pytest.raises(ImportError):
        from nerfacc.cuda import _C  # noqa: F401  (the old, always-failing probe)
    monkeypatch.setenv("PATH", "/nonexistent")  # no nvcc: nerfacc skips the build
    sys.modules.pop("nerfacc.cuda._backend", None)
    assert nerfacc_cuda._load_extension() is None
    sys.modules.pop("nerfacc.cuda._backend", None)


def test_a_failed_load_is_cached_and_logged_once(fresh_probe, monkeypatch, tmp_path, caplog):
    calls = []

    def failing_load():
        calls.append(1)
        raise RuntimeError("Error building extension 'nerfacc_cuda'\nninja: build stopped")

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(nerfacc_cuda, "_load_extension", failing_load)
    monkeypatch.setattr(nerfacc_cuda, "toolkit_problems", lambda *a, **k: [])
    with caplog.at_level(logging.WARNING):
        assert [nerfacc_cuda.available() for _ in range(3)] == [False] * 3
    assert len(calls) == 1
    assert nerfacc_cuda.probe().reason == "nerfacc's CUDA build failed: Error building extension 'nerfacc_cuda'"
    lines = [r.getMessage() for r in caplog.records if "marcher unavailable" in r.getMessage()]
    assert len(lines) == 1 and "stratified sampler" in lines[0]


def test_occgrid_refusal_names_the_reason(fresh_probe):
    from perpneg3d.renderer import DiffuseMaterial, SolidBackground, VolumeRenderer

    with pytest.raises(ConfigError, match=r"estimator=occgrid needs nerfacc's CUDA kernels \(no CUDA device\)"):
        VolumeRenderer(SolidBackground(), DiffuseMaterial(), estimator="occgrid")


def test_a_stale_lock_is_refused_instead_of_waited_on(fresh_probe, monkeypatch, tmp_path):
    lock = tmp_path / "nerfacc_cuda" / "lock"
    lock.parent.mkdir()
    lock.touch()
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(nerfacc_cuda, "_load_extension", lambda: pytest.fail("must not load while a stale lock exists"))
    result = nerfacc_cuda.probe()
    assert not result.ok and f"rm {lock}" in result.reason and "\n" not in result.reason


def test_a_timed_out_build_is_killed_with_its_children_and_its_lock_removed(monkeypatch, tmp_path):
    """The build's child starts a grandchild (as ninja starts nvcc) and hangs: at the timeout the whole
    process group is killed, not only the child, and the lock it left is removed."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    lock = tmp_path / "nerfacc_cuda" / "lock"
    pid_file = tmp_path / "grandchild.pid"
    monkeypatch.setattr(nerfacc_cuda, "BUILD_CODE", (
        "import pathlib, subprocess, time\n"
        f"lock = pathlib.Path({str(lock)!r}); lock.parent.mkdir(exist_ok=True); lock.touch()\n"
        "p = subprocess.Popen(['sleep', '60'])\n"
        f"pathlib.Path({str(pid_file)!r}).write_text(str(p.pid))\n"
        "time.sleep(60)\n"))
    result = nerfacc_cuda.build(timeout_s=3)
    assert not result.ok and "did not finish in 3 s" in result.reason and not lock.exists()
    grandchild = int(pid_file.read_text())
    time.sleep(0.2)
    stat = Path(f"/proc/{grandchild}/stat")
    assert not stat.exists() or stat.read_text().rsplit(")", 1)[1].split()[0] == "Z"  # gone (or a zombie awaiting init)


def test_a_failed_build_reports_its_first_error_not_ninjas_last_line():
    output = "\n".join([
        "[1/9] c++ -c pybind.cpp", "[2/9] nvcc -c grid.cu",
        "FAILED: nerfacc_cuda.so", "c++ grid.cuda.o -o nerfacc_cuda.so -L/x/lib64 -lcudart",
        "/usr/bin/ld: cannot find -lcudart: No such file or directory",
        "collect2: error: ld returned 1 exit status", "ninja: build stopped: subcommand failed.",
        "Traceback (most recent call last):", "RuntimeError: Error building extension 'nerfacc_cuda'"])
    assert nerfacc_cuda.first_error(output) == "/usr/bin/ld: cannot find -lcudart: No such file or directory"


def test_pip_cuda_13_layout_gives_the_build_its_paths(monkeypatch, tmp_path):
    """pip's CUDA 13 wheels: nvidia/cu13/{bin/nvcc, include, lib/libcudart.so.13} and no libcudart.so. The
    build environment names that toolkit, puts its headers on CPATH and links libcudart.so to the .so.13."""
    cu13 = tmp_path / "site" / "nvidia" / "cu13"
    (cu13 / "bin").mkdir(parents=True)
    (cu13 / "bin" / "nvcc").write_text("")
    (cu13 / "include" / "cccl").mkdir(parents=True)
    for header in nerfacc_cuda.REQUIRED_HEADERS:
        (cu13 / "include" / header).write_text("")
    (cu13 / "lib").mkdir()
    (cu13 / "lib" / "libcudart.so.13").write_text("")
    monkeypatch.setattr(sys, "path", [str(tmp_path / "site")])
    monkeypatch.setattr(nerfacc_cuda, "DEFAULT_CUDA_HOME", tmp_path / "no-system-toolkit")
    env = {"PATH": str(tmp_path / "empty"), "TORCH_EXTENSIONS_DIR": str(tmp_path / "ext")}
    out = nerfacc_cuda.build_environment(env)
    assert out["CUDA_HOME"] == str(cu13)
    assert out["PATH"].split(os.pathsep)[0] == str(cu13 / "bin")
    assert out["CPATH"].split(os.pathsep) == [str(cu13 / "include"), str(cu13 / "include" / "cccl")]
    link = Path(out["LIBRARY_PATH"].split(os.pathsep)[0]) / "libcudart.so"
    assert link.resolve() == (cu13 / "lib" / "libcudart.so.13").resolve()
    assert nerfacc_cuda.toolkit_problems(dict(env, **out)) == []


def test_a_complete_system_toolkit_is_used_alone_with_ninja_and_the_device_s_arch(monkeypatch, tmp_path):
    """The node's layout: /usr/local/cuda (bin/nvcc, include/ with every header, lib64/libcudart.so) while pip's
    CUDA wheels are installed too (torch's dependencies). The build uses the system toolkit alone: no pip
    headers on CPATH (two CUDA releases' headers were never compiled together), no libcudart link; this
    Python's folder (ninja) on PATH; TORCH_CUDA_ARCH_LIST from the GPU. A toolkit lacking a header gets pip's."""
    system = tmp_path / "usr-local-cuda"
    (system / "bin").mkdir(parents=True)
    (system / "bin" / "nvcc").write_text("")
    (system / "include").mkdir()
    for header in nerfacc_cuda.REQUIRED_HEADERS:
        (system / "include" / header).write_text("")
    (system / "lib64").mkdir()
    (system / "lib64" / "libcudart.so").write_text("")
    cu13 = tmp_path / "site" / "nvidia" / "cu13"
    (cu13 / "include" / "cccl").mkdir(parents=True)
    monkeypatch.setattr(sys, "path", [str(tmp_path / "site")])
    monkeypatch.setattr(nerfacc_cuda, "DEFAULT_CUDA_HOME", system)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    env = {"PATH": "/usr/bin", "TORCH_EXTENSIONS_DIR": str(tmp_path / "ext"), "TORCH_CUDA_ARCH_LIST": "7.0;8.0;9.0"}
    out = nerfacc_cuda.build_environment(env)
    assert out == {"CUDA_HOME": str(system), "TORCH_CUDA_ARCH_LIST": "9.0",
                   "PATH": os.pathsep.join([str(system / "bin"), str(Path(sys.executable).parent), "/usr/bin"])}
    (system / "include" / "cusparse.h").unlink()  # an incomplete toolkit: pip's headers fill the gap
    assert nerfacc_cuda.build_environment(env)["CPATH"].split(os.pathsep) == [str(cu13 / "include"),
                                                                             str(cu13 / "include" / "cccl")]


def test_build_directory_matches_torch(monkeypatch, tmp_path):
    from torch.utils.cpp_extension import _get_build_directory

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    assert nerfacc_cuda.build_directory() == Path(_get_build_directory("nerfacc_cuda", verbose=False))
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert nerfacc_cuda.build_directory() == Path(_get_build_directory("nerfacc_cuda", verbose=False))


def fake_toolkit(root: Path, headers=nerfacc_cuda.REQUIRED_HEADERS) -> Path:
    (root / "bin").mkdir(parents=True)
    (root / "bin" / "nvcc").write_bytes(b"\x7fELF" + b"\0" * 5000)
    (root / "bin" / "nvcc").chmod(0o755)
    (root / "include").mkdir()
    for header in headers:
        (root / "include" / header).touch()
    return root


def test_toolkit_problems_name_each_fix(tmp_path, monkeypatch):
    monkeypatch.setattr(nerfacc_cuda, "DEFAULT_CUDA_HOME", tmp_path / "no-such-toolkit")
    monkeypatch.setattr(nerfacc_cuda, "_pip_cuda_dirs", lambda: [])  # nor pip's (the rehearsal's venv has it)
    assert "CUDA_HOME is unset and nvcc is not on PATH" in nerfacc_cuda.toolkit_problems({"PATH": str(tmp_path)})[0]
    wrapper_dir = tmp_path / "wrapper"
    wrapper_dir.mkdir()
    assert "has no bin/nvcc: point it at the toolkit folder" in nerfacc_cuda.toolkit_problems({"CUDA_HOME": str(wrapper_dir)})[0]
    full = fake_toolkit(tmp_path / "cuda")
    assert nerfacc_cuda.toolkit_problems({"CUDA_HOME": str(full)}, extra_include_dirs=[]) == []
    partial = fake_toolkit(tmp_path / "cuda2", headers=("cuda_runtime.h", "cublas_v2.h", "curand_kernel.h"))
    pip_include = tmp_path / "site-packages" / "nvidia" / "cusparse" / "include"
    pip_include.mkdir(parents=True)
    (pip_include / "cusparse.h").touch()
    problems = nerfacc_cuda.toolkit_problems({"CUDA_HOME": str(partial)}, extra_include_dirs=[pip_include])
    assert problems == [f"cusparse.h is not under CUDA_HOME={partial} but in {pip_include}: export CPATH={pip_include}:$CPATH"]
    assert nerfacc_cuda.toolkit_problems({"CUDA_HOME": str(partial), "CPATH": str(pip_include)}, [pip_include]) == []


def test_cuda_home_follows_a_wrapper_script(tmp_path):
    real = fake_toolkit(tmp_path / "cuda-13.0")
    wrapper = tmp_path / "local" / "bin"
    wrapper.mkdir(parents=True)
    (wrapper / "nvcc").write_text(f'#!/bin/sh\nexec {real}/bin/nvcc "$@"\n')
    (wrapper / "nvcc").chmod(0o755)
    assert nerfacc_cuda.cuda_home({"PATH": str(wrapper)}) == str(real)
    assert nerfacc_cuda.cuda_home({"PATH": str(real / "bin")}) == str(real)
    assert nerfacc_cuda.cuda_home({"CUDA_HOME": "/opt/cuda", "PATH": str(wrapper)}) == "/opt/cuda"


class BrokenTcnn:
    """A tinycudann whose build has no kernel for this GPU: it imports, then fails at first use."""

    class Encoding(torch.nn.Module):
        def __init__(self, *args, **kwargs):
            super().__init__()
            raise RuntimeError("CUDA error: no kernel image is available for execution on the device")


def test_tcnn_failing_at_first_use_falls_back_to_torch(monkeypatch, caplog):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(hash_grid, "import_tcnn", lambda: BrokenTcnn)
    with caplog.at_level(logging.WARNING):
        enc = HashGridEncoding(n_levels=4, log2_hashmap_size=10, finest_resolution=32, implementation="auto")
    assert enc.implementation == "torch" and isinstance(enc.encoding, hash_grid.TorchHashGrid)
    assert [r.getMessage() for r in caplog.records] == [
        "tinycudann fails on this GPU (CUDA error: no kernel image is available for execution on the device); "
        "using the torch hash grid"]
    with pytest.raises(ConfigError, match="implementation=tcnn: tinycudann fails on this GPU"):
        HashGridEncoding(n_levels=4, log2_hashmap_size=10, finest_resolution=32, implementation="tcnn")


def test_tcnn_raising_other_errors_at_import_is_absent(monkeypatch, tmp_path):
    pkg = tmp_path / "tinycudann"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("raise RuntimeError('compiled for sm_80 only')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "tinycudann", raising=False)
    assert hash_grid.import_tcnn() is None


def test_loaded_level_count_reaches_the_forward_pass():
    """active_levels lives on the host for forward(); a checkpoint's value must update it."""
    torch.manual_seed(0)
    enc = HashGridEncoding(n_levels=4, log2_hashmap_size=10, finest_resolution=32, implementation="torch")
    enc.encoding.embeddings.data.uniform_(-1, 1)
    saved = HashGridEncoding(n_levels=4, log2_hashmap_size=10, finest_resolution=32, implementation="torch")
    saved.load_state_dict(enc.state_dict())
    saved.set_active_levels(2)
    enc.load_state_dict(saved.state_dict())
    feats = enc(torch.rand(64, 3))
    assert feats[:, 4:].abs().max() == 0 and feats[:, :4].abs().max() > 0


def test_random_streams_resume_where_they_stopped():
    rng = RandomStreams.seeded(3)
    torch.rand(5, generator=rng.host), torch.rand(5, generator=rng.device)
    state = rng.state_dict()
    expected = (torch.rand(4, generator=rng.host), torch.randn(4, generator=rng.device), torch.rand(2))
    other = RandomStreams.seeded(99)
    other.load_state_dict(state)
    got = (torch.rand(4, generator=other.host), torch.randn(4, generator=other.device), torch.rand(2))
    assert all(torch.equal(a, b) for a, b in zip(expected, got))
    assert not torch.equal(expected[0], torch.rand(4, generator=RandomStreams.seeded(3).device))  # two streams


def test_empty_marcher_output_gets_one_zero_weight_sample():
    from nerfacc import accumulate_along_rays, render_weight_from_density

    empty = torch.zeros(0, dtype=torch.long), torch.zeros(0), torch.zeros(0)
    ray_ids, t_starts, t_ends = ensure_samples(*empty)
    assert ray_ids.tolist() == [0] and t_starts.tolist() == [0.0] and t_ends.tolist() == [0.0]
    density = torch.tensor([5.0], requires_grad=True)
    weights = render_weight_from_density(t_starts.view(1, 1), t_ends.view(1, 1), density.view(1, 1))[0].view(-1)
    opacity = accumulate_along_rays(weights, None, ray_indices=ray_ids, n_rays=3)
    assert opacity.tolist() == [[0.0], [0.0], [0.0]]
    opacity.sum().backward()
    assert torch.isfinite(density.grad).all()
    full = torch.tensor([1, 2]), torch.tensor([0.1, 0.2]), torch.tensor([0.2, 0.3])
    assert all(a is b for a, b in zip(ensure_samples(*full), full))


def test_subprocess_env_keeps_an_existing_pythonpath(monkeypatch):
    monkeypatch.setenv("PYTHONPATH", "/tmp/site")
    assert subprocess_env()["PYTHONPATH"].split(os.pathsep) == [str(ROOT / "tests"), str(ROOT), "/tmp/site"]


def test_make_test_gpu_refuses_a_python_without_cuda():
    """No false green: without CUDA the GPU targets fail and say why, and create no venv."""
    done = subprocess.run(["make", "-s", "test-gpu", f"PYTHON={sys.executable}", "VENV=/nonexistent-venv"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "sees no CUDA device" in done.stdout + done.stderr
    assert not Path("/nonexistent-venv").exists()


def wheelhouse_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_wheelhouse", ROOT / "scripts" / "make_wheelhouse.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_node_package_list_is_read_as_pinned_or_unknown(tmp_path):
    wh = wheelhouse_module()
    listing = tmp_path / "node.txt"
    listing.write_text("# a comment\ntorch==2.11.0+cu130\nNumPy==2.5.2\nscipy\nmy_pkg @ file:///src/my_pkg\n\n")
    assert wh.read_node_packages(listing) == {"torch": "2.11.0+cu130", "numpy": "2.5.2", "scipy": None, "my-pkg": None}
    listing.write_text("numpy==2.5.2\n")
    with pytest.raises(PerpNegError, match="lists no torch: the node needs its CUDA torch"):
        wh.read_node_packages(listing)


def test_a_stand_in_wheel_is_what_pip_resolves_for_the_nodes_torch(tmp_path):
    """pip (offline, only the stand-in folder) resolves torch==2.11.0+cu130 to the stand-in: that
    version, no requirements, nothing to download."""
    wh = wheelhouse_module()
    (tmp_path / "stand-ins").mkdir()
    wh.stand_in_wheel("torch", "2.11.0+cu130", tmp_path / "stand-ins")
    wh.stand_in_wheel("numpy", "2.5.2+node", tmp_path / "stand-ins")
    done = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--no-index", "--ignore-installed",
                           "--find-links", str(tmp_path / "stand-ins"), "--report", str(tmp_path / "r.json"),
                           "--target", str(tmp_path / "t"), "torch>=2.1", "numpy==2.5.2"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    install = {i["metadata"]["name"]: i for i in json.loads((tmp_path / "r.json").read_text())["install"]}
    assert install["torch"]["metadata"]["version"] == "2.11.0+cu130" and not install["torch"]["metadata"].get("requires_dist")
    assert install["numpy"]["metadata"]["version"] == "2.5.2+node"  # == 2.5.2 admits the local label


def test_wheelhouse_plan_carries_what_the_node_lacks_or_may_not_satisfy():
    wh = wheelhouse_module()

    def item(name, version, url="https://files/x.whl", requires=()):
        return dict(metadata=dict(name=name, version=version, requires_dist=list(requires)), download_info=dict(url=url))

    install = [item("perpneg3d", "0.1.0", "file:///repo", ["torch>=2.1", "nerfacc==0.5.3", "scipy", "pydantic>=2"]),
               item("torch", "2.11.0+cu130", "file:///tmp/w/stand-ins/torch-2.11.0+cu130-py3-none-any.whl"),
               item("numpy", "2.5.2+node", "file:///tmp/w/stand-ins/numpy-2.5.2+node-py3-none-any.whl"),
               item("nerfacc", "0.5.3", requires=["rich>=12", "typing-extensions; python_version < '3.8'"]),
               item("pydantic", "2.14.4", requires=["typing-extensions>=4.16.0", "pydantic-core==2.50.5"]),
               item("pydantic-core", "2.50.5"), item("typing-extensions", "4.16.0"), item("rich", "15.0.0"),
               item("scipy", "1.18.1")]
    node = {"torch": "2.11.0+cu130", "numpy": "2.5.2", "scipy": None, "typing-extensions": None, "rich": None}
    carry, notes = wh.plan(install, node, "3.12")
    # the node lacks nerfacc and pydantic; its typing-extensions and rich are of unknown versions under a bound
    assert carry == [("nerfacc", "0.5.3"), ("pydantic", "2.14.4"), ("pydantic-core", "2.50.5"),
                     ("typing-extensions", "4.16.0"), ("rich", "15.0.0")]
    assert "scipy: the node has it and nothing constrains its version" in notes
    # nerfacc's typing-extensions marker is false on 3.12: only pydantic's bound counts
    assert wh.constrained(install, "3.12")["typing-extensions"] == ">=4.16.0"


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA")])])
def test_a_resumed_run_continues_the_same_random_streams(tmp_path, device):
    """Stop after step 3, resume: at step 6 every generator (CPU, device, CUDA default) is where the
    uninterrupted run's is. (Bit-exact weights are checked on the CPU in test_fault_tolerance.)"""
    import shutil

    from helpers import TINY_TOY, compose_train
    from perpneg3d.training.checkpoint import checkpoint_path, load_checkpoint
    from perpneg3d.training.run import train

    run = TINY_TOY + ["trainer.max_steps=6", "trainer.ckpt_every=3", "~export", "evaluate_janus=false",
                      f"guidance.denoiser.device={device}"]
    straight = train(compose_train(run, tmp_path / "a"))
    copy = tmp_path / "b" / "run"
    shutil.copytree(straight, copy)
    checkpoint_path(copy, 6).unlink()
    resumed = train(compose_train(run + [f"resume={copy}"], tmp_path / "b"))
    a, b = load_checkpoint(checkpoint_path(straight, 6))["generator"], load_checkpoint(checkpoint_path(resumed, 6))["generator"]
    assert set(a) == set(b) >= {"host", "device", "torch_cpu"} and ("torch_cuda" in a) == (device == "cuda")
    assert a["device_type"] == b["device_type"] == device
    for key in set(a) - {"device_type"}:
        same = [torch.equal(x, y) for x, y in zip(a[key], b[key])] if key == "torch_cuda" else [torch.equal(a[key], b[key])]
        assert all(same), key
    first = load_checkpoint(checkpoint_path(resumed, 3))["generator"]
    assert not torch.equal(first["device"], b["device"])  # the streams did advance
