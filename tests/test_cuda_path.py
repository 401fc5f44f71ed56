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

from helpers import TINY_TOY, subprocess_env
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


def test_gpu_check_cpu_tiny_mode_writes_its_report(tmp_path):
    done = subprocess.run([sys.executable, "scripts/gpu_check.py", "--device", "cpu", "--tiny", "--skip-pytest",
                           "--out", str(tmp_path)], cwd=ROOT, env=subprocess_env(), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_report.json").read_text())
    sds = report["sds_step"]
    assert sds["unet_batch"] == 4  # [uncond | pos | neg_front | neg_side] for one camera, in one call
    assert sds["sds_nonfinite"] == 0 and sds["loss_finite"] and sds["render_grad_norm"] > 0
    assert sds["vae_latents_rel_error_vs_fp32"] < 1e-5  # float32 on a CPU: the same computation
    rows = {r["label"]: r for r in report["step_benchmark"]["rows"]}
    assert set(rows) == {"Perp-Neg (K=2)", "plain (K=0)", "Perp-Neg + channels_last", "Perp-Neg + cudnn.benchmark"}
    assert all(r["ms"]["step"] > 0 and r["skipped_steps"] == 0 for r in rows.values())
    assert report["parity"]["hash_grid_cpu_vs_device_max_abs"] == 0.0
    assert "no CUDA device" in report["sync_count"]["skipped"]
    refine = report["refine"]  # torch rasterizer timed; nvdiffrast said absent on a CPU; refine steps ran
    assert refine["faces"] == 5120 and refine["torch_ms"] > 0 and "not installed or not on CUDA" in refine["nvdiffrast"]
    assert refine["refine_step_ms"] > 0 and refine["refine_renderer"] == "rasterizer auto" and "parity_ok" not in refine
    md = (tmp_path / "gpu_report.md").read_text()
    assert "| Perp-Neg (K=2) |" in md and "## sds_step" in md


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


def gpu_check_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "scripts" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def check_args(budget_s=60.0):
    import argparse

    return argparse.Namespace(tiny=True, budget_s=budget_s, device=torch.device("cpu"))


def test_gpu_check_writes_its_report_after_each_section(tmp_path):
    """A section that raises is recorded and the next ones still run; each section sees on disk the
    report of the ones before it (a run killed mid-section keeps them)."""
    gc = gpu_check_module()
    seen = {}

    def boom(args):
        raise RuntimeError("no kernel image is available")

    def third(args):
        seen.update(json.loads((tmp_path / "gpu_report.json").read_text()))
        return dict(ok=True)

    report = gc.run_sections([("environment", lambda args: dict(torch="x")), ("sds_step", boom), ("parity", third)],
                             check_args(), tmp_path)
    assert seen["environment"]["torch"] == "x" and seen["sds_step"]["error"] == "RuntimeError: no kernel image is available"
    assert seen["failed_checks"] == ["sds_step: RuntimeError: no kernel image is available"]
    assert report["parity"]["ok"] is True
    assert "**Failed checks: 1**" in (tmp_path / "gpu_report.md").read_text()


def test_gpu_check_budget_skips_the_sections_that_would_start_late(tmp_path):
    gc = gpu_check_module()
    ran = []

    def slow(args):
        ran.append("slow")
        time.sleep(0.3)
        return {}

    report = gc.run_sections([("environment", slow), ("step_benchmark", lambda a: ran.append("bench") or {}),
                              ("compile", lambda a: ran.append("compile") or {})], check_args(budget_s=0.2), tmp_path)
    assert ran == ["slow"]
    for name in ("step_benchmark", "compile"):
        assert report[name] == dict(skipped="budget of 0 s spent before this section started")
    on_disk = json.loads((tmp_path / "gpu_report.json").read_text())
    assert on_disk["compile"]["skipped"].startswith("budget") and on_disk["failed_checks"] == []


@pytest.mark.parametrize("report, expected", [
    (dict(environment=dict(nerfacc_kernels=dict(ok=False, reason="build failed: ld: cannot find -lcudart"))),
     "environment.nerfacc_kernels: build failed: ld: cannot find -lcudart"),
    (dict(sds_step=dict(sds_nonfinite=12, loss_finite=True, render_grad_finite=True)),
     "sds_step: non-finite values (sds_nonfinite=12, loss_finite=True, render_grad_finite=True)"),
    (dict(parity=dict(marcher_vs_sampler=dict(mean_abs_rgb=0.2, tolerance=0.03, ok=False))),
     "parity.marcher_vs_sampler: {'mean_abs_rgb': 0.2, 'tolerance': 0.03, 'ok': False}"),
    (dict(sync_count=dict(own=3, nerfacc_sampler=8, ok=False, locations=["volume_renderer.py:90"])),
     "sync_count: 3 synchronisations of perpneg3d's own per step (target 0): ['volume_renderer.py:90']"),
    (dict(pytest_gpu=dict(exit_code=1, ok=False, summary="1 failed, 5 passed")), "pytest_gpu: 1 failed, 5 passed"),
])
def test_gpu_check_names_each_failed_check(report, expected):
    assert gpu_check_module().failed_checks(dict(tiny=False, **report)) == [expected]


def test_gpu_check_passing_checks_are_not_failures():
    report = dict(environment=dict(nerfacc_kernels=dict(ok=True)), sds_step=dict(sds_nonfinite=0, loss_finite=True,
                  render_grad_finite=True), parity=dict(marcher_vs_sampler=dict(ok=True), tcnn_vs_torch=dict(skipped="x")),
                  sync_count=dict(own=0, nerfacc_sampler=8, ok=True), pytest_gpu=dict(exit_code=0, ok=True))
    assert gpu_check_module().failed_checks(report) == []


def test_gpu_check_exits_1_when_a_check_fails(tmp_path, monkeypatch):
    gc = gpu_check_module()
    monkeypatch.setattr(gc, "SECTIONS", (("sync_count", lambda args: dict(own=1, ok=False, locations=["x.py:1"])),))
    assert gc.main(["--device", "cpu", "--tiny", "--out", str(tmp_path)]) == 1
    monkeypatch.setattr(gc, "SECTIONS", (("sync_count", lambda args: dict(own=0, ok=True)),))
    assert gc.main(["--device", "cpu", "--tiny", "--out", str(tmp_path)]) == 0


def test_syncs_are_attributed_by_their_stack():
    """Each synchronisation's owner from the whole Python stack at the moment it happens (outermost first), not
    from the file its warning names: nerfacc's sampler anywhere on the stack; the skip decision; the normals
    pass, a known sync with its reason; a sync inside autograd's engine (the backward pass, which torch runs
    under its own files); anything else under perpneg3d is its own, named by its innermost perpneg3d line."""
    gc = gpu_check_module()
    skip = gc.skip_decision_line()
    known = gc.known_syncs()
    (normals_file, normals_line), = known
    trainer = ("/repo/perpneg3d/training/trainer.py", 200)
    stacks = {
        "nerfacc": [trainer, ("/repo/perpneg3d/renderer/volume_renderer.py", 160),
                    ("/site-packages/nerfacc/estimators/occ_grid.py", 118)],
        "skip_decision": [trainer, ("/repo/perpneg3d/training/" + skip[0], skip[1])],
        "known": [trainer, ("/repo/perpneg3d/renderer/" + normals_file, normals_line)],
        "backward": [trainer, ("/site-packages/torch/_tensor.py", 625),
                     ("/site-packages/torch/autograd/graph.py", 825)],
        "own": [trainer, ("/repo/perpneg3d/renderer/volume_renderer.py", 90), ("/site-packages/torch/functional.py", 5)],
    }
    for expected, stack in stacks.items():
        assert gc.classify_stack(stack, skip, known) == expected, expected
    assert gc.own_site(stacks["own"]) == "volume_renderer.py:90"
    source = (ROOT / "perpneg3d" / "training" / skip[0]).read_text().splitlines()[skip[1] - 1]
    assert "the step's one sync" in source
    source = (ROOT / "perpneg3d" / "renderer" / normals_file).read_text().splitlines()[normals_line - 1]
    assert "torch.nonzero" in source and "known sync: normals" in source


def test_a_section_past_the_budget_is_stopped_and_incomplete_not_failed(tmp_path):
    """Every section is capped by the budget left (plus GRACE_S for its child processes to end): one still running
    then is stopped and reported incomplete, and the next are skipped; neither is a failed check."""
    gc = gpu_check_module()
    ran = []

    def endless(args):
        ran.append("endless")
        while True:
            time.sleep(0.01)

    args = check_args(budget_s=0.2)
    original, gc.GRACE_S = gc.GRACE_S, 0.1
    try:
        started = time.perf_counter()
        report = gc.run_sections([("compile", endless), ("pytest_gpu", lambda a: ran.append("tests") or {})], args,
                                 tmp_path)
    finally:
        gc.GRACE_S = original
    assert ran == ["endless"] and time.perf_counter() - started < 5
    assert report["compile"]["incomplete"].startswith("budget: stopped after 0 s")
    assert report["pytest_gpu"]["skipped"].startswith("budget")
    assert gc.failed_checks(report) == []


def test_a_section_that_turns_cudnn_benchmark_on_leaves_it_as_it_was(tmp_path):
    gc = gpu_check_module()
    before = torch.backends.cudnn.benchmark
    seen = []

    def turns_on(args):
        torch.backends.cudnn.benchmark = True
        return {}

    gc.run_sections([("step_benchmark", turns_on), ("refine", lambda a: seen.append(torch.backends.cudnn.benchmark)
                                                    or {})], check_args(), tmp_path)
    assert seen == [before] and torch.backends.cudnn.benchmark == before


def test_a_pytest_section_cut_short_is_incomplete_with_its_output(monkeypatch):
    gc = gpu_check_module()

    def slow(*a, **kw):
        raise subprocess.TimeoutExpired(a[0], kw["timeout"], output="collected 40 items\n....")

    monkeypatch.setattr(gc.subprocess, "run", slow)
    args = check_args(budget_s=30.0)
    args.pytest_timeout, args.remaining = 240.0, lambda: 30.0
    result = gc.gpu_tests(args)
    assert result["ok"] is None and result["incomplete"] == "budget: stopped after 30 s"
    assert result["log_tail"] == "collected 40 items\n...."
    assert gc.failed_checks(dict(pytest_gpu=result)) == []


def test_the_whole_step_is_timed_apart_from_the_phases():
    """measure(): ms["step"] from steps timed whole (no synchronisation at the phase edges), the phase split
    from a second pass whose total is ms["step_phased"]; the phases fit inside it."""
    from perpneg3d.training.step_benchmark import build_setup, measure

    result = measure(build_setup(TINY_TOY), steps=2, warmup=1)
    ms = result["ms"]
    assert ms["step"] > 0 and ms["step_phased"] > 0 and result["its"] == pytest.approx(1000 / ms["step"])
    parts = sum(ms[k] for k in ("render", "prompts", "guidance", "backward", "optimizer"))
    assert parts <= ms["step_phased"] * 1.001
