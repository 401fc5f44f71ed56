"""Wheels for a GPU node without internet, resolved against the node's own packages (`make wheelhouse`).

    python scripts/make_wheelhouse.py --node-packages gpu/node-packages.txt --python-version 3.12 --dest wheelhouse

Run it where pip reaches the package index. The node's list (its `python -m pip list --format=freeze`, or
gpu/node-packages.txt written from its image's documentation) says what the node has:
- `name==version`: installed at that version. pip's resolver sees a stand-in wheel of exactly that version
  (no files, no requirements: the node has what it needs), so every other package is chosen to fit it,
  and nothing of it is downloaded. torch is always such a stand-in: the node's CUDA build is never replaced.
- a bare `name`: installed, version unknown. It is left out unless some requirement constrains its version;
  then a wheel that fits is carried, and pip on the node keeps the installed one if that already fits.
Everything else the project and its tests need is resolved by pip (one `pip install --dry-run --report`
with the node's Python version and platform) and downloaded as wheels; packages published only as source
(antlr4-python3-runtime) are built into wheels here. clip-anytorch (the tests' CLIP vocabulary; its declared
requirements would pull torchvision) goes into requirements-nodeps.txt. On the node:

    python -m pip install --no-index --find-links wheelhouse -r wheelhouse/requirements.txt
    python -m pip install --no-index --no-deps --find-links wheelhouse -r wheelhouse/requirements-nodeps.txt
    python -m pip install --no-index --no-deps --no-build-isolation -e .
"""
from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement

from perpneg3d.errors import PerpNegError, reported_errors

ROOT = Path(__file__).resolve().parents[1]
TEST_ROOTS = ("pytest",)  # the test runner; the project itself comes from its setup.py
NODE_EXTRAS = ("gsplat",)  # setup.py's extras the node gets too: gsplat's CUDA rasterizer (Apache-2.0; nvdiffrast's
# non-commercial licence keeps it out: a user installs it knowingly)
NO_DEPS = ("clip-anytorch==2.6.0",)  # the tests' CLIP vocabulary (a data file): installed without its requirements
ALWAYS_STAND_IN = {"torch"}  # never downloaded or replaced, whatever the list says
MANYLINUX = ("manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux_2_24_x86_64", "manylinux_2_27_x86_64",
             "manylinux_2_28_x86_64", "manylinux_2_31_x86_64", "manylinux_2_34_x86_64", "manylinux_2_35_x86_64",
             "manylinux1_x86_64", "linux_x86_64")
LIMIT_MB = 64  # what one call of this project's GPU machine carries
SMALLER = {"imageio-ffmpeg": "0.6.0"}  # 0.8's wheel alone is 65 MB; 0.6.0 (12 MB) has the same ffmpeg interface


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_node_packages(path: Path) -> dict[str, str | None]:
    """name -> version (None: installed, version unknown) from a `pip list --format=freeze`-like file."""
    found: dict[str, str | None] = {}
    for line in Path(path).read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        if " @ " in line:  # a direct reference: installed, version unknown here
            found[normalise(line.split(" @ ")[0])] = None
            continue
        name, _, version = line.partition("==")
        found[normalise(name)] = version.strip() or None
    if "torch" not in found:
        raise PerpNegError(f"{path} lists no torch: the node needs its CUDA torch (add torch==<version>, e.g. 2.11.0+cu130)")
    return found


def stand_in_wheel(name: str, version: str, folder: Path) -> Path:
    """A wheel of `name==version` with no files and no requirements: what pip's resolver sees of a package
    the node already has."""
    dist = f"{re.sub(r'[-.]+', '_', name)}-{version}"
    files = {f"{dist}.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
             f"{dist}.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: perpneg3d\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    record = []
    for path, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(text.encode())}")
    files[f"{dist}.dist-info/RECORD"] = "\n".join(record + [f"{dist}.dist-info/RECORD,,"]) + "\n"
    wheel = folder / f"{dist}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        for path, text in files.items():
            zf.writestr(path, text)
    return wheel


def find_python(version: str) -> str | None:
    """A Python of that major.minor that really runs: python<version> on PATH (a pyenv shim for a version
    that is not active fails), else pyenv's own install of it."""
    root = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv")) / "versions"
    candidates = [shutil.which(f"python{version}")]
    candidates += [str(p) for p in sorted(root.glob(f"{version}.*/bin/python{version}"), reverse=True)] if root.is_dir() else []
    for candidate in filter(None, candidates):
        done = subprocess.run([candidate, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                              capture_output=True, text=True)
        if done.returncode == 0 and done.stdout.strip() == version:
            return candidate
    return None


def pip(python: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([python, "-m", "pip", *args], capture_output=True, text=True)


def target_args(python_version: str) -> list[str]:
    tags = [a for p in MANYLINUX for a in ("--platform", p)]
    return ["--python-version", python_version, "--implementation", "cp", *tags, "--only-binary=:all:"]


def resolve(python: str, python_version: str, node: dict[str, str | None], work: Path) -> list[dict]:
    """pip's resolution of the project + tests against the node's packages: the report's install list."""
    stand_ins, built = work / "stand-ins", work / "built"
    stand_ins.mkdir()
    built.mkdir()
    # a stand-in's version carries a local label (2.5.2+node): pinned to it, pip cannot take the index's
    # 2.5.2 wheel instead (torch's own label, +cu130, already does that)
    pinned = {n: v if "+" in v else f"{v}+node" for n, v in node.items() if v is not None}
    for name, version in pinned.items():
        stand_in_wheel(name, version, stand_ins)
    pinned.update({n: v for n, v in SMALLER.items() if n not in pinned})
    (work / "constraints.txt").write_text("".join(f"{n}=={v}\n" for n, v in sorted(pinned.items())))
    (work / "roots.txt").write_text("".join(f"{r}\n" for r in (f"{ROOT}[{','.join(NODE_EXTRAS)}]", *TEST_ROOTS)))
    for _ in range(10):  # each round builds a wheel for one package the index has as source only
        done = pip(python, "install", "--dry-run", "--ignore-installed", "--report", str(work / "report.json"),
                   "--target", str(work / "target"), *target_args(python_version), "--find-links", str(stand_ins),
                   "--find-links", str(built), "-c", str(work / "constraints.txt"), "-r", str(work / "roots.txt"))
        if done.returncode == 0:
            return json.loads((work / "report.json").read_text())["install"]
        spec = source_only(done.stdout + done.stderr)
        if spec is None or any(built.glob(f"{re.sub(r'[-.]+', '_', spec.split('=')[0])}-*.whl")):
            conflict = re.findall(r"^\s+(\S+ \S+ depends on .+)$", done.stdout, flags=re.M)
            raise PerpNegError(f"pip could not resolve the project against the node's packages: "
                               f"{conflict[0] if conflict else _pip_error(done.stderr)}")
        wheel = pip(python, "wheel", "--quiet", "--no-deps", "-w", str(built), spec)
        if wheel.returncode != 0:
            raise PerpNegError(f"{spec} has no wheel for Python {python_version} on the index and does not build: "
                               f"{_pip_error(wheel.stderr)}")
        print(f"built a wheel for {spec} (source only on the index)", flush=True)
    raise PerpNegError("pip's resolution kept needing source builds: see --keep-work")


def source_only(pip_output: str) -> str | None:
    """The requirement pip found no wheel for (with --only-binary), from its messages, or None."""
    missing = re.search(r"No matching distribution found for ([A-Za-z0-9._-]+)(==[^\s;]+)?", pip_output)
    if missing:
        return missing.group(1) + (missing.group(2) or "")
    # a pinned dependency every candidate shares, e.g. "hydra-core 1.3.8 depends on antlr4-python3-runtime==4.9.*"
    pins = re.findall(r"depends on ([A-Za-z0-9._-]+)(==[^\s;]+)", pip_output)
    return "".join(max(set(pins), key=pins.count)) if pins else None


def _pip_error(stderr: str) -> str:
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip().startswith("ERROR")] or stderr.strip().splitlines()[-1:]
    return lines[0] if lines else "?"


def constrained(install: list[dict], python_version: str) -> dict[str, str]:
    """name -> the specifiers that the resolved packages put on it (markers evaluated for the node)."""
    env = dict(default_environment(), python_version=python_version, python_full_version=f"{python_version}.0",
               sys_platform="linux", platform_system="Linux", platform_machine="x86_64")
    specs: dict[str, list[str]] = {}
    for item in install:
        for text in item["metadata"].get("requires_dist", []):
            req = Requirement(text)
            if req.marker is not None and not req.marker.evaluate(dict(env, extra="")):
                continue
            if str(req.specifier):
                specs.setdefault(normalise(req.name), []).append(str(req.specifier))
    return {k: ",".join(v) for k, v in specs.items()}


def plan(install: list[dict], node: dict[str, str | None], python_version: str) -> tuple[list[tuple[str, str]], list[str]]:
    """(name, version) to carry, and the lines saying why others stay out."""
    specs = constrained(install, python_version)
    carry, notes = [], []
    for item in install:
        name, version = normalise(item["metadata"]["name"]), item["metadata"]["version"]
        url = item["download_info"]["url"]
        if url.startswith("file://") and "/stand-ins/" in url:
            notes.append(f"{name}: the node has {version.removesuffix('+node')}")
            continue  # the node has it at exactly this version
        if name == "perpneg3d" or name in ALWAYS_STAND_IN:
            continue
        if name in node and name not in specs:
            notes.append(f"{name}: the node has it and nothing constrains its version")
            continue
        if name in node:
            notes.append(f"{name}: carried although the node has it (version unknown; required {specs[name]})")
        carry.append((name, version))
    return carry, notes


def node_side(notes: list[str], node: dict[str, str | None]) -> str:
    """The node's packages that the resolution relies on, as pip requirements (pinned where the list
    pins them; torch by its public version): what gpu_rehearsal.py installs to shape a venv like the node."""
    names = sorted({n.split(":")[0] for n in notes} & set(node))
    lines = [f"{n}=={node[n].split('+')[0]}" if node[n] else n for n in names]
    return "".join(f"{line}\n" for line in lines)


FALLBACK_MAX_MB = 2.0


def drop_large_fallbacks(carry: list[tuple[str, str]], node: dict, dest: Path) -> tuple[list[tuple[str, str]], list[str]]:
    """A wheel carried only as a fallback for a package the node has at an unknown version is dropped when
    it is large (scipy: 34 MB): the node's recent release almost surely fits, the wheelhouse must fit the
    64 MB a GPU call carries, and the GPU command's `pip check` names any requirement the node misses."""
    kept, notes = [], []
    for name, version in carry:
        wheels = [p for p in dest.glob("*.whl") if normalise(p.name.split("-")[0]) == name]
        size_mb = sum(p.stat().st_size for p in wheels) / 2**20
        if name in node and node[name] is None and size_mb > FALLBACK_MAX_MB:
            for p in wheels:
                p.unlink()
            notes.append(f"{name}: left out although constrained ({size_mb:.0f} MB; the node's own version is "
                         "checked by pip check on the node)")
            continue
        kept.append((name, version))
    return kept, notes


def download(python: str, python_version: str, carry: list[tuple[str, str]], built: Path, dest: Path) -> list[str]:
    """Wheels of `carry` into dest (built ones copied); returns the specs that failed."""
    failed = []
    for name, version in carry:
        spec = f"{name}=={version}"
        local = [p for p in built.glob("*.whl") if normalise(p.name.split("-")[0]) == name]
        if local:
            shutil.copy2(local[0], dest / local[0].name)
            continue
        done = pip(python, "download", "--quiet", "--no-deps", *target_args(python_version), "-d", str(dest), spec)
        if done.returncode != 0:
            failed.append(f"{spec} ({_pip_error(done.stderr)})")
    return failed


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--node-packages", type=Path, default=ROOT / "gpu" / "node-packages.txt",
                        help="the node's `pip list --format=freeze` (default: gpu/node-packages.txt)")
    parser.add_argument("--python-version", default="3.12", help="the node's Python, e.g. 3.12")
    parser.add_argument("--resolver-python", default=None,
                        help="a Python of the node's version to run pip with (default: python<version> on PATH, else this one)")
    parser.add_argument("--dest", type=Path, default=Path("wheelhouse"))
    parser.add_argument("--platform", default=None, help="ignored (kept for old command lines): all manylinux tags are tried")
    args = parser.parse_args(argv)
    python = args.resolver_python or find_python(args.python_version) or sys.executable
    if python == sys.executable and f"{sys.version_info.major}.{sys.version_info.minor}" != args.python_version:
        print(f"no python{args.python_version} here: resolving with {python}, whose version decides pip's environment "
              f"markers (pass --resolver-python)")
    node = read_node_packages(args.node_packages)
    dest = args.dest
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    with tempfile.TemporaryDirectory(prefix="wheelhouse-") as tmp:
        work = Path(tmp)
        install = resolve(python, args.python_version, node, work)
        carry, notes = plan(install, node, args.python_version)
        failed = download(python, args.python_version, carry, work / "built", dest)
        carry, dropped = drop_large_fallbacks(carry, node, dest)
        notes += dropped
        failed += download(python, args.python_version, [tuple(s.split("==")) for s in NO_DEPS], work / "built", dest)
    # only what the node lacks is listed: a fallback (a package the node has at an unknown version) stays
    # out of the list, so pip on the node takes it from the folder only if the node's own does not fit
    (dest / "requirements.txt").write_text("".join(f"{n}=={v}\n" for n, v in carry if n not in node))
    (dest / "node-side.txt").write_text(node_side(notes, node))
    (dest / "requirements-nodeps.txt").write_text("".join(f"{s}\n" for s in NO_DEPS))
    size_mb = sum(p.stat().st_size for p in dest.glob("*.whl")) / 2**20
    for note in notes:
        print(note if ": carried" in note or ": left out" in note or ": the node has " in note else f"left out {note}")
    print(f"{len(carry) + len(NO_DEPS)} wheels, {size_mb:.1f} MB in {dest} (limit {LIMIT_MB} MB), resolved with "
          f"{python} against {args.node_packages} ({sum(v is not None for v in node.values())} pinned of {len(node)})")
    if failed:
        print(f"no wheel for: {'; '.join(failed)}")
    return 1 if failed or size_mb > LIMIT_MB else 0


if __name__ == "__main__":
    with reported_errors():  # a user's mistake or Ctrl-C: one line, no traceback
        sys.exit(main())
