"""Write a gallery page for one run, a sweep or a benchmark folder: PATH/gallery/index.html.

    python scripts/gallery.py outputs/toy/<timestamp>            # one run
    python scripts/gallery.py outputs/multirun/<timestamp>       # a sweep (written by itself at the sweep's end)
    python scripts/gallery.py outputs/bench_janus                 # a benchmark, its bench.md on top

The folder is self-contained (relative links, no network): open index.html in a browser, or copy the folder.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from perpneg3d.errors import reported_errors
from perpneg3d.gallery import write_gallery


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", type=Path, help="a run, sweep or benchmark folder")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    page = write_gallery(args.path)
    size = sum(p.stat().st_size for p in page.parent.rglob("*") if p.is_file())
    print(f"gallery: {page} ({size / 1e6:.1f} MB, {time.perf_counter() - start:.1f} s)")
    return 0


if __name__ == "__main__":
    with reported_errors():  # a user's mistake or Ctrl-C: one line, no traceback
        sys.exit(main())
