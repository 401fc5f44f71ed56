"""Wheels of every non-torch dependency, for a GPU node without internet (`make wheelhouse`).

    python scripts/make_wheelhouse.py --python-version 3.12 --platform manylinux2014_x86_64 --dest wheelhouse

Run it where pip reaches the package index, from the project's venv (`make install`): the versions
are those installed there, i.e. the set the test suite passed with. torch and everything torch itself
requires are left out (the node has a CUDA torch; reinstalling it would replace that build). Packages
published only as source (antlr4-python3-runtime 4.9.3, pure Python) are built into wheels here.
--node-packages takes the node's own `python -m pip list --format=freeze` (it works offline) and
leaves out what the node already has: the whole closure is about 143 MB (scipy, numpy, imageio-ffmpeg
and transformers alone are 90 MB), a typical CUDA node needs far less. Writes
<dest>/requirements.txt; on the node:

    python -m pip install --no-index --find-links wheelhouse -r wheelhouse/requirements.txt
    python -m pip install --no-index --no-deps --no-build-isolation -e .
"""
from __future__ import annotations

import argparse
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

from perpneg3d.errors import reported_errors

ROOTS = ("perpneg3d", "pytest", "clip-anytorch")  # the project, its test runner, the tests' CLIP vocabulary
MANYLINUX = ("manylinux2014_x86_64", "manylinux_2_17_x86_64", "manylinux_2_24_x86_64", "manylinux_2_28_x86_64",
             "manylinux_2_31_x86_64", "manylinux_2_34_x86_64", "manylinux1_x86_64")
# Wheels whose newest release is too large for a 64 MB wheelhouse get an older, compatible one.
PINNED = {"imageio-ffmpeg": "0.6.0"}
LIMIT_MB = 64


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirements_of(name: str) -> list[str]:
    """Names a distribution requires, without extras-only requirements."""
    found = []
    for req in metadata.requires(name) or []:
        if "extra ==" in req.replace('"', "'").replace("extra=='", "extra == '"):
            continue
        match = re.match(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)", req)
        if match:
            found.append(normalise(match.group(1)))
    return found


def closure(roots) -> set[str]:
    """Installed distributions reachable from `roots` (requirements not installed here are skipped:
    their markers excluded them on this Python)."""
    seen, todo = set(), [normalise(r) for r in roots]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        try:
            metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
        seen.add(name)
        todo += requirements_of(name)
    return seen


def pip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--python-version", default="3.12", help="the node's Python, e.g. 3.10, 3.11, 3.12")
    parser.add_argument("--platform", default="manylinux2014_x86_64", help="oldest manylinux tag the node accepts")
    parser.add_argument("--dest", default="wheelhouse")
    parser.add_argument("--node-packages", default=None,
                        help="the node's `pip list --format=freeze` output: packages it has are left out")
    args = parser.parse_args(argv)
    dest = Path(args.dest)
    dest.mkdir(parents=True, exist_ok=True)
    present = set()
    if args.node_packages:
        lines = Path(args.node_packages).read_text().splitlines()
        present = {normalise(re.split(r"[=<>@ ]", ln.strip(), maxsplit=1)[0]) for ln in lines if ln.strip() and not ln.startswith("#")}
    wanted = sorted(closure(ROOTS) - closure(["torch"]) - {"perpneg3d"} - present)
    platforms = [args.platform] + [p for p in MANYLINUX if p != args.platform]
    pins, failed = [], []
    for name in wanted:
        version = PINNED.get(name, metadata.version(name))
        spec = f"{name}=={version}"
        tags = [a for p in platforms for a in ("--platform", p)]
        done = pip("download", "-q", "--no-deps", "--only-binary=:all:", "--python-version", args.python_version,
                   "--implementation", "cp", *tags, "-d", str(dest), spec)
        if done.returncode != 0:  # source-only on the index: build a wheel (pure Python ones work anywhere)
            done = pip("wheel", "-q", "--no-deps", "-w", str(dest), spec)
        (pins if done.returncode == 0 else failed).append(spec)
        print(f"{'ok ' if done.returncode == 0 else 'FAILED'} {spec}", flush=True)
    (dest / "requirements.txt").write_text("\n".join(pins) + "\n")
    size_mb = sum(p.stat().st_size for p in dest.glob("*.whl")) / 2**20
    print(f"{len(pins)} wheels, {size_mb:.1f} MB in {dest} (limit {LIMIT_MB} MB); requirements in {dest / 'requirements.txt'}")
    if failed:
        print(f"no wheel for: {', '.join(failed)}: download them where the node's Python matches, or build them")
    return 1 if failed or size_mb > LIMIT_MB else 0


if __name__ == "__main__":
    with reported_errors():  # a user's mistake or Ctrl-C: one line, no traceback
        sys.exit(main())
