"""The GPU node's first contact, rehearsed on a CPU machine (`make gpu-rehearsal`).

    python scripts/gpu_rehearsal.py [--node-packages gpu/node-packages.txt] [--python python3.12]

Runs what a GPU session runs, in a venv shaped like the node, and prints one summary line per step (ok or
FAILED, its time, the first error line):
1. venv: the node's Python minor version (.rehearsal/venv, reused while its torch matches);
2. node: the node's torch (its CUDA build, from the package index) and the node's versions of the packages
   the project relies on (gpu/node-packages.txt; what the wheelhouse resolution calls node-side);
3. wheelhouse: `make_wheelhouse.py` resolved against the node's list;
4. gpu-command: the one GPU command, `scripts/gpu_node.sh`, exactly as README runs it, with gpu_check in its
   CPU mode (`--device cpu --tiny`): offline install from the wheelhouse, pip check, the report;
5. cuda-compiler: the package index's CUDA compiler wheels (nvidia-cuda-nvcc, -cccl, -runtime) of torch's CUDA;
6. nerfacc-build: nerfacc's kernels compiled and linked for sm_90 (H100/H200) with them, and imported;
7. nerfacc-build-system: the same with the node's layout, a system toolkit (a CUDA_HOME shaped like
   /usr/local/cuda) used alone while pip's CUDA wheels are installed too;
8. gsplat-build: gsplat's kernels (the Gaussians' CUDA rasterizer) compiled and linked for sm_90 with pip's
   toolkit, and imported; its outcome, with the first error line, is what README and docs/gpu.md report;
9. tests: the CPU test suite in that venv.
It downloads several GB the first time (torch's CUDA build and its libraries). Not part of CI; run it after
any change to the dependencies, the wheelhouse, the CUDA build or gpu_check (README, "GPU").
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / ".rehearsal"
ARCH = "9.0"  # the H100's and H200's compute capability (sm_90)
# a new process loads the built kernels as a run does (probe(): the build environment first, then the package's
# loader). Without it torch's JIT writes other compiler command lines, ninja rebuilds every object, and the link
# misses pip's libcudart.so (seen 2026-12-03: both builds "failed" in their load check after building)
LOAD = ("from perpneg3d.renderer.nerfacc_cuda import ensure_cuda_home; ensure_cuda_home(); "
        "from {package}.cuda import _backend; import sys; sys.exit(0 if _backend._C is not None else 'not loaded')")


def read_torch(node_packages: Path) -> str:
    """The node's torch version (e.g. 2.11.0+cu130) from its package list."""
    for line in node_packages.read_text().splitlines():
        match = re.match(r"^\s*torch==(\S+)", line)
        if match:
            return match.group(1)
    raise SystemExit(f"{node_packages} pins no torch version: add torch==<version>")


def system_toolkit(pip_toolkit: Path, folder: Path) -> Path:
    """A CUDA_HOME shaped like /usr/local/cuda made of pip's toolkit (links): bin/, include/ and nvvm/ as they are,
    lib64/ with every library of pip's lib/ and the unversioned libcudart.so a system toolkit has."""
    shutil.rmtree(folder, ignore_errors=True)
    (folder / "lib64").mkdir(parents=True)
    for part in ("bin", "include", "nvvm"):
        if (pip_toolkit / part).exists():
            (folder / part).symlink_to(pip_toolkit / part)
    for library in sorted((pip_toolkit / "lib").iterdir()):
        (folder / "lib64" / library.name).symlink_to(library)
    cudart = sorted((pip_toolkit / "lib").glob("libcudart.so.*"))
    if cudart and not (folder / "lib64" / "libcudart.so").exists():
        (folder / "lib64" / "libcudart.so").symlink_to(cudart[0])
    return folder


def first_error(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and "WARNING: Location" not in ln]
    errors = [ln for ln in lines if re.search(r"(ERROR|[Ee]rror|FAILED|cannot find|No such file|failed)", ln)]
    return (errors or lines[-1:] or ["no output"])[0][:240]


class Rehearsal:
    def __init__(self, args):
        self.args, self.rows, self.started = args, [], time.time()
        self.venv = WORK / "venv"
        self.py = str(self.venv / "bin" / "python")
        self.logs = WORK / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)

    def step(self, name: str, *commands: list[str], env: dict | None = None, check=None) -> bool:
        """Run commands in order (stop at the first failure), log them to .rehearsal/logs/<name>.log."""
        t0 = time.time()
        log = self.logs / f"{name}.log"
        ok, output = True, ""
        with open(log, "w") as f:
            for cmd in commands:
                done = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, **(env or {})), stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True)
                f.write(f"$ {' '.join(cmd)}\n{done.stdout}\n")
                output += done.stdout
                if done.returncode != 0:
                    ok = False
                    break
        if ok and check is not None:
            problem = check(output)
            ok, output = problem is None, problem or output
        seconds = time.time() - t0
        self.rows.append((name, ok, seconds, "" if ok else first_error(output)))
        print(f"{'ok    ' if ok else 'FAILED'} {name} ({seconds:.0f} s){'' if ok else ': ' + first_error(output)}"
              f"  [log: {log.relative_to(ROOT)}]", flush=True)
        return ok

    def run(self) -> int:
        a = self.args
        torch_version = read_torch(a.node_packages)
        have = subprocess.run([self.py, "-c", "import torch; print(torch.__version__)"], capture_output=True,
                              text=True).stdout.strip() if self.venv.exists() else ""
        if have != torch_version:
            shutil.rmtree(self.venv, ignore_errors=True)
            if not self.step("venv", [a.python, "-m", "venv", str(self.venv)],
                             [self.py, "-m", "pip", "install", "-q", "--upgrade", "pip"]):
                return self.summary()
        else:
            self.rows.append(("venv", True, 0.0, ""))
            print(f"ok     venv (0 s): reused {self.venv.relative_to(ROOT)} (torch {have})", flush=True)
        wheelhouse = ROOT / "wheelhouse"
        ok = self.step("wheelhouse", [sys.executable, "scripts/make_wheelhouse.py", "--node-packages", str(a.node_packages),
                                      "--python-version", a.python_version, "--resolver-python", self.py,
                                      "--dest", str(wheelhouse)], env=dict(PYTHONPATH=str(ROOT)))
        if not ok:
            return self.summary()
        node_side = (wheelhouse / "node-side.txt").read_text().split()
        torch_public = torch_version.split("+")[0]
        ok = self.step("node", [self.py, "-m", "pip", "install", "-q", f"torch=={torch_public}", *node_side],
                       check=lambda out: self.torch_is(torch_version))
        shutil.rmtree(WORK / "gpu_out", ignore_errors=True)
        ok = ok and self.step("gpu-command", ["bash", "scripts/gpu_node.sh", str(WORK / "gpu_out"), "--device", "cpu",
                                              "--tiny", "--skip-pytest"], env=dict(PYTHON=self.py),
                              check=lambda out: next((ln for ln in out.splitlines() if ln.startswith("FAILED")), None))
        cuda = torch_version.split("+cu")[-1] if "+cu" in torch_version else None
        if ok and cuda:
            major, minor_cuda = cuda[:-1], cuda[-1]
            spec = f"=={major}.{minor_cuda}.*"
            # nvcc's own parts too (nvvm's cicc, crt headers): unpinned, pip takes 13.5's, whose cicc writes PTX
            # 9.5 that 13.0's ptxas refuses ("Unsupported .version 9.5")
            ok = self.step("cuda-compiler", [self.py, "-m", "pip", "install", "-q", *(
                f"nvidia-{part}{spec}" for part in ("cuda-nvcc", "cuda-cccl", "cuda-runtime", "nvvm", "cuda-crt"))])
            cuda_ok = ok
            # the pip toolkit, not a system one this machine may have: CUDA_HOME names it; build_environment
            # finds its headers and makes the libcudart.so link, as on a node with pip's CUDA
            site = subprocess.run([self.py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                  capture_output=True, text=True).stdout.strip()
            build_env = dict(TORCH_CUDA_ARCH_LIST=ARCH, TORCH_EXTENSIONS_DIR=str(WORK / "torch_extensions"),
                             MAX_JOBS=str(os.cpu_count() or 2), CUDA_HOME=str(Path(site) / "nvidia" / f"cu{major}"))
            shutil.rmtree(WORK / "torch_extensions", ignore_errors=True)
            ok = ok and self.build_step("nerfacc-build", build_env)
            # the node's layout: a system toolkit at /usr/local/cuda (bin/, include/, lib64/ with libcudart.so),
            # used alone, while pip's CUDA wheels are installed too (torch's)
            system = system_toolkit(Path(site) / "nvidia" / f"cu{major}", WORK / "usr-local-cuda")
            shutil.rmtree(WORK / "torch_extensions_system", ignore_errors=True)
            ok = ok and self.build_step("nerfacc-build-system", dict(
                build_env, CUDA_HOME=str(system), CPATH="", LIBRARY_PATH="",
                TORCH_EXTENSIONS_DIR=str(WORK / "torch_extensions_system")), check=lambda out: (
                    None if "build environment: CPATH=" not in out else "pip's headers were put on CPATH beside the "
                    "system toolkit's"))
            # gsplat's kernels whatever nerfacc's did (they are independent): pip's toolkit, as nerfacc-build
            if cuda_ok:
                shutil.rmtree(WORK / "torch_extensions_gsplat", ignore_errors=True)  # a real build, not a reload
                self.step("gsplat-build", [self.py, "-m", "perpneg3d.renderer.gsplat_rasterizer", "--without-device",
                                           "--timeout", "5400"],
                          [self.py, "-c", LOAD.format(package="gsplat")],
                          env=dict(build_env, TORCH_EXTENSIONS_DIR=str(WORK / "torch_extensions_gsplat")))
        if ok and not a.skip_tests:
            self.step("tests", [self.py, "-m", "pytest", "-q", "-x", "-m", "not slurm"])
        return self.summary()

    def build_step(self, name: str, env: dict, check=None) -> bool:
        """nerfacc's kernels compiled and linked for ARCH in the environment `env`, then imported."""
        return self.step(name, [self.py, "-m", "perpneg3d.renderer.nerfacc_cuda", "--build", "--without-device",
                                "--timeout", "1800"],
                         [self.py, "-c", LOAD.format(package="nerfacc")], env=env, check=check)

    def torch_is(self, version: str) -> str | None:
        got = subprocess.run([self.py, "-c", "import torch; print(torch.__version__)"], capture_output=True,
                             text=True).stdout.strip()
        return None if got == version else f"the venv's torch is {got!r}, the node's is {version}"

    def summary(self) -> int:
        total = time.time() - self.started
        print(f"\ngpu rehearsal: {sum(ok for _, ok, _, _ in self.rows)} of {len(self.rows)} steps ok in {total / 60:.1f} min")
        for name, ok, seconds, error in self.rows:
            print(f"  {'ok    ' if ok else 'FAILED'} {name:<14} {seconds:7.0f} s  {error}")
        return 0 if all(ok for _, ok, _, _ in self.rows) else 1


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--node-packages", type=Path, default=ROOT / "gpu" / "node-packages.txt")
    parser.add_argument("--python-version", default="3.12", help="the node's Python (major.minor)")
    parser.add_argument("--python", default=None, help="a Python of that version here (default: python<version>)")
    parser.add_argument("--skip-tests", action="store_true", help="leave out the CPU test suite (about 10 minutes)")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).parent))
    from make_wheelhouse import find_python

    args.python = args.python or find_python(args.python_version)
    if args.python is None:
        print(f"gpu_rehearsal: no python{args.python_version} here: install it (pyenv install {args.python_version}) "
              f"or pass --python")
        return 2
    return Rehearsal(args).run()


if __name__ == "__main__":
    sys.exit(main())
