"""nerfacc's CUDA kernels: what their build needs, one cached probe, and a build step with a timeout.

nerfacc 0.5.3 compiles its kernels on first use (torch's JIT extension build: nvcc + ninja) and keeps
them in ``nerfacc.cuda._backend._C``. That build needs:

- a CUDA toolkit: ``CUDA_HOME`` (or nvcc on PATH) naming the folder that holds ``bin/nvcc`` and
  ``include/``, not a wrapper's folder;
- the CUDA headers torch's extension build includes (``cuda_runtime.h``, ``cusparse.h``,
  ``cublas_v2.h``, ``curand_kernel.h``). With pip-installed CUDA they live in
  ``site-packages/nvidia/<lib>/include``: put those folders on ``CPATH``;
- a writable build folder: ``$TORCH_EXTENSIONS_DIR/nerfacc_cuda`` (default
  ``~/.cache/torch_extensions/<python><cuda>/nerfacc_cuda``).

A build that is killed leaves ``<build folder>/lock`` behind, and every later load waits for it forever.
``probe()`` refuses to load while that file exists (one line saying how to clear it), so training falls
back to the stratified sampler instead of hanging; ``python -m perpneg3d.renderer.nerfacc_cuda --build``
builds in a child process with a timeout and removes the lock of a build it had to kill. See
docs/gpu.md.
"""
from __future__ import annotations

import argparse
import functools
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from perpneg3d.errors import first_line, reported_errors

log = logging.getLogger(__name__)
EXTENSION_NAME = "nerfacc_cuda"
DEFAULT_CUDA_HOME = Path("/usr/local/cuda")  # torch's own fallback
REQUIRED_HEADERS = ("cuda_runtime.h", "cusparse.h", "cublas_v2.h", "curand_kernel.h")


@dataclass(frozen=True)
class Probe:
    """Whether the kernels load (or built), why not, and how long it took; module when loaded here."""

    ok: bool
    reason: str
    seconds: float = 0.0
    module: object | None = None
    log_tail: str = ""  # a failed build's last LOG_TAIL_LINES lines of output (gpu_check's report keeps them)


LOG_TAIL_LINES = 80


def tail(output: str, lines: int = LOG_TAIL_LINES) -> str:
    """The last `lines` lines of a command's output."""
    return "\n".join(output.rstrip().splitlines()[-lines:])


def build_directory(env: dict | None = None, extension: str = EXTENSION_NAME) -> Path:
    """Where torch's JIT build puts (and looks for) an extension (nerfacc's by default); nothing is created."""
    env = os.environ if env is None else env
    root = env.get("TORCH_EXTENSIONS_DIR")
    if not root:
        version = f"py{sys.version_info.major}{sys.version_info.minor}{getattr(sys, 'abiflags', '')}"
        cuda = f"_cu{torch.version.cuda.replace('.', '')}" if torch.version.cuda else "_cpu"
        cache = env.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
        root = str(Path(cache) / "torch_extensions" / f"{version}{cuda}")
    return Path(root) / extension


def stale_lock(build_dir: Path) -> Path | None:
    """The lock file a killed build left in `build_dir`, or None."""
    lock = Path(build_dir) / "lock"
    return lock if lock.exists() else None


def _wrapped_nvcc(nvcc: Path) -> Path | None:
    """The real nvcc that a small wrapper script (e.g. /usr/local/bin/nvcc: exec .../cuda-13.0/bin/nvcc)
    hands over to, or None when `nvcc` is not such a script."""
    try:
        if nvcc.stat().st_size > 4096:
            return None
        text = nvcc.read_text()
    except (OSError, UnicodeDecodeError):
        return None
    match = re.search(r"(/\S+/bin/nvcc)\b", text)
    return Path(match.group(1)) if match and Path(match.group(1)) != nvcc else None


def cuda_home(env: dict | None = None) -> str | None:
    """The toolkit folder the build should use: CUDA_HOME or CUDA_PATH when set; else the folder
    above nvcc's bin/, following a wrapper script to the real toolkit (torch's own guess would take
    the wrapper's folder); else /usr/local/cuda when it exists; else pip's CUDA compiler
    (nvidia-cuda-nvcc: site-packages/nvidia/cu13/bin/nvcc, or nvidia/cuda_nvcc/bin/nvcc before CUDA 13)."""
    env = os.environ if env is None else env
    home = env.get("CUDA_HOME") or env.get("CUDA_PATH")
    if home:
        return home
    nvcc = shutil.which("nvcc", path=env.get("PATH"))
    if nvcc:
        real = Path(nvcc).resolve()
        wrapped = _wrapped_nvcc(real)
        return str((wrapped.resolve() if wrapped else real).parent.parent)
    if DEFAULT_CUDA_HOME.is_dir():
        return str(DEFAULT_CUDA_HOME)
    pip_nvcc = [d for d in _pip_cuda_dirs() if (d / "bin" / "nvcc").is_file()]
    return str(pip_nvcc[0]) if pip_nvcc else None


def _pip_cuda_dirs() -> list[Path]:
    """Folders of pip-installed CUDA: site-packages/nvidia/cu13 (CUDA 13's wheels share one folder) or
    site-packages/nvidia/<library> (CUDA 12's: cuda_runtime, cublas, ...)."""
    found = []
    for entry in sys.path:
        nvidia = Path(entry) / "nvidia"
        if nvidia.is_dir():
            found += sorted(p for p in nvidia.iterdir() if p.is_dir() and not p.name.startswith("__"))
    return found


def _pip_cuda_include_dirs() -> list[Path]:
    """include/ folders of pip-installed CUDA (nvidia/cu13/include, nvidia/<lib>/include), with CCCL's
    (nvidia/cu13/include/cccl: thrust, cub, libcu++) where it has its own."""
    found = []
    for folder in _pip_cuda_dirs():
        include = folder / "include"
        if include.is_dir():
            found.append(include)
            found += [p for p in (include / "cccl",) if p.is_dir()]
    return found


def _pip_cudart() -> Path | None:
    """pip's CUDA runtime library: libcudart.so, or only its versioned name (libcudart.so.13)."""
    for folder in _pip_cuda_dirs():
        for lib in ("lib", "lib64"):
            found = sorted((folder / lib).glob("libcudart.so*")) if (folder / lib).is_dir() else []
            if found:
                return found[0]
    return None


def _missing_headers(home: Path) -> list[str]:
    """REQUIRED_HEADERS that the toolkit at `home` does not hold itself (include/ or targets/*/include)."""
    folders = [home / "include", *sorted(home.glob("targets/*/include"))]
    return [h for h in REQUIRED_HEADERS if not any((d / h).is_file() for d in folders)]


def device_arch() -> str | None:
    """This machine's GPU's compute capability as TORCH_CUDA_ARCH_LIST wants it ("9.0"), or None without one."""
    if not torch.cuda.is_available():
        return None
    try:
        major, minor = torch.cuda.get_device_capability()
    except (AssertionError, RuntimeError):  # a device that cannot be queried: torch's own arch list applies
        return None
    return f"{major}.{minor}"


def build_environment(env: dict | None = None) -> dict[str, str]:
    """Variables the JIT build needs, found for both toolkit layouts (a system toolkit, /usr/local/cuda or
    CUDA_HOME; pip's nvidia-cuda-* wheels): CUDA_HOME; its bin/ and this Python's folder (where pip puts
    ninja, which a venv that is not activated leaves off PATH) on PATH; CPATH with pip's include folders when
    the toolkit is pip's or lacks headers torch's build includes (a complete system toolkit is used alone:
    its headers and pip's, of another CUDA release, were never compiled together); LIBRARY_PATH with a folder
    holding `libcudart.so` (torch links with -lcudart, and pip's runtime wheel ships only libcudart.so.13, so a
    link to it is made next to the build folder); and TORCH_CUDA_ARCH_LIST from this machine's GPU (one
    architecture: building for every one torch knows takes several times longer)."""
    env = dict(os.environ if env is None else env)
    out: dict[str, str] = {}
    arch = device_arch()
    if arch is not None and env.get("TORCH_CUDA_ARCH_LIST") != arch:
        out["TORCH_CUDA_ARCH_LIST"] = arch
    home = cuda_home(env)
    if home is None:
        return out
    out["CUDA_HOME"] = home
    path = env.get("PATH", "").split(os.pathsep)
    wanted = [d for d in (str(Path(home) / "bin"), str(Path(sys.executable).parent)) if d not in path]
    if wanted:
        out["PATH"] = os.pathsep.join(wanted + [env.get("PATH", "")])
    pip_toolkit = Path(home).resolve() in {d.resolve() for d in _pip_cuda_dirs()}
    if pip_toolkit or _missing_headers(Path(home)):
        includes = [str(p) for p in _pip_cuda_include_dirs()]
        current = [p for p in env.get("CPATH", "").split(os.pathsep) if p]
        if [p for p in includes if p not in current]:
            out["CPATH"] = os.pathsep.join(current + [p for p in includes if p not in current])
    system_lib = any((Path(home) / lib / "libcudart.so").exists() for lib in ("lib64", "lib"))
    cudart = None if system_lib else _pip_cudart()
    if cudart is not None:
        if cudart.name == "libcudart.so":
            lib_dir = cudart.parent
        else:
            lib_dir = build_directory(env).parent / "perpneg3d-cudart"
            lib_dir.mkdir(parents=True, exist_ok=True)
            link = lib_dir / "libcudart.so"
            if not link.exists():
                link.symlink_to(cudart)
        libs = [p for p in env.get("LIBRARY_PATH", "").split(os.pathsep) if p]
        if str(lib_dir) not in libs:
            out["LIBRARY_PATH"] = os.pathsep.join([str(lib_dir)] + libs)
    return out


def ensure_cuda_home() -> dict[str, str]:
    """Put build_environment() into os.environ for an in-process build (a CUDA_HOME already set stays:
    build_environment starts from it); returns what it set."""
    was_set = bool(os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"))
    updates = build_environment()
    os.environ.update(updates)
    if "CUDA_HOME" in updates:
        extension = sys.modules.get("torch.utils.cpp_extension")
        if extension is not None:  # already imported: it read CUDA_HOME at import time
            extension.CUDA_HOME = updates["CUDA_HOME"]
        if not was_set:
            log.info("CUDA_HOME unset: using the toolkit at %s", updates["CUDA_HOME"])
    return updates


def toolkit_problems(env: dict | None = None, extra_include_dirs: list[Path] | None = None) -> list[str]:
    """What stops the JIT build, one line each with the fix (empty when nothing does)."""
    env = os.environ if env is None else env
    home = cuda_home(env)
    if home is None:
        return ["no CUDA toolkit: CUDA_HOME is unset and nvcc is not on PATH; install the toolkit matching "
                f"torch's CUDA {torch.version.cuda} and export CUDA_HOME=/path/to/toolkit"]
    home_path = Path(home)
    if not (home_path / "bin" / "nvcc").is_file():
        return [f"CUDA_HOME={home} has no bin/nvcc: point it at the toolkit folder (the one holding bin/nvcc "
                "and include/), not at a wrapper's folder"]
    searched = [Path(p) for p in env.get("CPATH", "").split(os.pathsep) if p]
    extra = _pip_cuda_include_dirs() if extra_include_dirs is None else extra_include_dirs
    problems = []
    for header in _missing_headers(home_path):
        if any((d / header).is_file() for d in searched):
            continue
        elsewhere = [d for d in extra if (d / header).is_file()]
        if elsewhere:
            problems.append(f"{header} is not under CUDA_HOME={home} but in {elsewhere[0]}: "
                            f"export CPATH={elsewhere[0]}{os.pathsep}$CPATH")
        else:
            problems.append(f"{header} is missing: install the CUDA toolkit's development headers "
                            f"(e.g. the cuda-libraries-dev package) into {home}/include")
    return problems


def _load_extension() -> object | None:
    from nerfacc.cuda import _backend  # noqa: PLC0415  (compiles on first import)

    return _backend._C


@functools.lru_cache(maxsize=1)
def probe() -> Probe:
    """Load nerfacc's kernels once per process; never raises, never waits on a stale lock.

    A failed attempt is cached: the build is not retried at every renderer construction.
    """
    if not torch.cuda.is_available():
        return Probe(False, "no CUDA device")
    lock = stale_lock(build_directory())
    if lock is not None:
        return Probe(False, f"a killed build left {lock}, and loading would wait on it forever: delete it "
                           f"(rm {lock}) or rebuild with python -m perpneg3d.renderer.nerfacc_cuda --build")
    ensure_cuda_home()
    start = time.perf_counter()
    try:
        module = _load_extension()
    except Exception as err:  # noqa: BLE001  (any build or load failure means: use the torch sampler)
        problems = toolkit_problems()
        return Probe(False, problems[0] if problems else f"nerfacc's CUDA build failed: {first_line(err, 200)}")
    if module is None:
        return Probe(False, "nerfacc found no nvcc on PATH: " + (toolkit_problems() or ["add the toolkit's bin/ to PATH"])[0])
    return Probe(True, "loaded", time.perf_counter() - start, module)


@functools.lru_cache(maxsize=1)
def available() -> bool:
    """True when the kernels load; on a CUDA machine where they do not, logs the reason once."""
    result = probe()
    if not result.ok and torch.cuda.is_available():
        log.warning("nerfacc CUDA marcher unavailable (%s); using the stratified sampler", result.reason)
    return result.ok


BUILD_CODE = "from nerfacc.cuda import _backend; import sys; sys.exit(0 if _backend._C is not None else 3)"
# the compiler's and linker's own words first; Python's exceptions only when there are none (nerfacc's
# "cannot import name 'csrc'" is its normal fallback to the JIT build, not the cause)
CAUSE_LINE = re.compile(r"(fatal|error:|error \(|cannot find|undefined reference|No such file|Killed)", re.IGNORECASE)
ERROR_LINE = re.compile(r"(error|not found)", re.IGNORECASE)


def first_error(output: str) -> str:
    """The line that says why a build failed: the first compiler or linker error, not ninja's closing
    `ninja: build stopped` or Python's traceback lines."""
    lines = [ln.strip() for ln in output.splitlines() if ln.strip()]
    for pattern in (CAUSE_LINE, ERROR_LINE):
        causes = [ln for ln in lines if pattern.search(ln) and not ln.startswith(
            ("ninja: build stopped", "Traceback", "RuntimeError: Error building", "ImportError: cannot import name 'csrc'"))]
        if causes:
            return causes[0][:300]
    return (lines[-1:] or ["no output"])[0][:300]


def build(timeout_s: float = 900.0, extension: str = EXTENSION_NAME, code: str | None = None,
          package: str = "nerfacc") -> Probe:
    """Build (or load) the kernels in a child process, in its own process group; on timeout kill the whole
    group (nvcc and ninja too, not only the child) and remove the lock it left. nerfacc's by default; another
    JIT-built package (gsplat: perpneg3d.renderer.gsplat_rasterizer) passes its extension's name and the code
    that loads it (exit 0: loaded; 3: the package found no toolkit)."""
    code = BUILD_CODE if code is None else code
    lock_before = stale_lock(build_directory(extension=extension))
    if lock_before is not None:
        return Probe(False, f"stale build lock {lock_before}: delete it (rm {lock_before}), then build again")
    env = dict(os.environ, **build_environment())
    start = time.perf_counter()
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             env=env, start_new_session=True)
    try:
        output, _ = child.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGKILL)
        output, _ = child.communicate()
        lock = stale_lock(build_directory(extension=extension))
        if lock is not None:
            lock.unlink(missing_ok=True)
        return Probe(False, f"build did not finish in {timeout_s:.0f} s (its processes killed; lock removed): run it "
                           "again with a larger --timeout, or check nvcc and ninja", time.perf_counter() - start,
                     log_tail=tail(output or ""))
    seconds = time.perf_counter() - start
    if child.returncode == 0:
        return Probe(True, "built", seconds)
    if child.returncode == 3:
        return Probe(False, f"{package} found no nvcc on PATH: " + (toolkit_problems(env) or ["install the CUDA toolkit"])[0],
                     seconds, log_tail=tail(output))
    problems = toolkit_problems(env)
    return Probe(False, f"build failed: {first_error(output)}" + (f" ({problems[0]})" if problems else ""), seconds,
                 log_tail=tail(output))


def build_parser(package: str, timeout_s: float) -> argparse.ArgumentParser:
    """The command line of a JIT-built package's check-or-build module (nerfacc's here, gsplat's)."""
    parser = argparse.ArgumentParser(description=f"Check or build {package}'s CUDA kernels (see docs/gpu.md).")
    parser.add_argument("--build", action="store_true", help="build now, in a child process with a timeout")
    parser.add_argument("--timeout", type=float, default=timeout_s, help="seconds the build may take")
    parser.add_argument("--without-device", action="store_true",
                        help="build on a machine without a GPU (set TORCH_CUDA_ARCH_LIST, e.g. 9.0): a compile and link check")
    return parser


def main(argv=None) -> int:
    args = build_parser("nerfacc", 900.0).parse_args(argv)
    print(f"build folder: {build_directory()}")
    for key, value in build_environment().items():
        print(f"build environment: {key}={value}")
    for problem in toolkit_problems(dict(os.environ, **build_environment())):
        print(f"problem: {problem}")
    if not torch.cuda.is_available() and not args.without_device:
        print("no CUDA device: nerfacc's marcher is not used on this machine (the stratified sampler is)")
        return 0 if not args.build else 1
    if args.without_device:
        if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
            print("--without-device needs TORCH_CUDA_ARCH_LIST (the GPU's compute capability, e.g. 9.0 for H100/H200)")
            return 2
        result = build(args.timeout)
        print(f"nerfacc CUDA kernels: {'built' if result.ok else 'failed'} ({result.reason}, {result.seconds:.1f} s)")
        return 0 if result.ok else 1
    result = build(args.timeout) if args.build else probe()
    print(f"nerfacc CUDA kernels: {'ok' if result.ok else 'unavailable'} ({result.reason}, {result.seconds:.1f} s)")
    return 0 if result.ok else 1


if __name__ == "__main__":
    with reported_errors():  # a user's mistake or Ctrl-C: one line, no traceback
        sys.exit(main())
