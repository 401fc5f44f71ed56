"""The gallery (issue 31): written at a sweep's end by itself, one card and one table row per run, the sweep's
overrides, missing artefacts in words; and the page itself in a real headless Chromium (marked `browser`)."""
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import TINY_TOY, subprocess_env
from perpneg3d.errors import ConfigError
from perpneg3d.gallery import find_runs, varying, write_gallery

ROOT = Path(__file__).resolve().parents[1]
FRAMES, FPS = 8, 4  # a 2 s turntable


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """A two-job toy sweep (seeds 0 and 1); job 1 without the Janus evaluation (so without its strip)."""
    out = tmp_path_factory.mktemp("gallery")
    args = [sys.executable, "train.py", "-m", "seed=0,1", *TINY_TOY, f"trainer.turntable_frames={FRAMES}",
            f"trainer.turntable_fps={FPS}", "threads=1", f"hydra.sweep.dir={out / 'sweep'}", f"out_dir={out}"]
    done = subprocess.run(args, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"gallery: {out / 'sweep' / 'gallery' / 'index.html'}" in done.stdout  # the sweep wrote it itself
    (out / "sweep" / "1" / "janus_strip.png").unlink()
    write_gallery(out / "sweep")
    return out / "sweep"


def test_one_card_and_row_per_run_with_the_sweep_s_overrides(sweep):
    runs = find_runs(sweep)
    assert [r.name for r in runs] == ["0", "1"] and varying(runs) == ["seed"]
    page = (sweep / "gallery" / "index.html").read_text()
    assert page.count("<section class='card'") == 2 and page.count("<tr data-f0=") == 2
    assert "<li>seed=0</li>" in page and "<li>seed=1</li>" in page
    metrics = json.loads((sweep / "0" / "metrics.json").read_text())
    assert f"<dd>{metrics['steps']}</dd>" in page
    # every file the page names is inside the gallery folder (self-contained), except the TensorBoard folders
    for link in re.findall(r"(?:src|href|poster)='([^'#]+)'", page):
        if not link.endswith("/tb"):
            assert (sweep / "gallery" / link).is_file() and not link.startswith(("/", "http", ".."))


def test_a_missing_artefact_is_said_in_words_not_shown_broken(sweep):
    page = (sweep / "gallery" / "index.html").read_text()
    card = page[page.index("id='run1'"):]
    assert "no Janus strip" in card and "runs/1/janus_strip.png" not in page
    assert "runs/0/janus_strip.png" in page


def test_no_run_is_one_line(tmp_path):
    with pytest.raises(ConfigError, match=r"^gallery: no run under .*: pass a folder written by train.py$"):
        write_gallery(tmp_path)


@pytest.fixture(scope="module")
def browser():
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("no chromium here: apt-get install chromium (.ci/run does it where it can)")
    playwright = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (make install does it)")
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium)
        yield browser
        browser.close()


@pytest.mark.browser
def test_the_page_in_chromium(sweep, browser, tmp_path):
    page = browser.new_page(viewport={"width": 1280, "height": 1200})
    errors, failed = [], []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("requestfailed", lambda r: failed.append(r.url))
    page.goto((sweep / "gallery" / "index.html").as_uri())
    page.wait_for_load_state("load")
    page.wait_for_function("Array.from(document.querySelectorAll('video')).every(v => v.readyState >= 2)",
                           timeout=30000)
    assert errors == [] and failed == []
    assert page.locator("section.card").count() == 2 and page.locator("#runs tbody tr").count() == 2
    assert page.evaluate("Array.from(document.images).every(i => i.complete && i.naturalWidth > 0)")
    assert page.evaluate("Array.from(document.querySelectorAll('video')).map(v => v.duration)") == [FRAMES / FPS] * 2
    seeds = lambda: page.eval_on_selector_all("#runs tbody tr", "rows => rows.map(r => r.children[1].textContent)")
    header = page.locator("#runs th", has_text="seed")
    header.click()
    assert seeds() == ["0", "1"]
    header.click()
    assert seeds() == ["1", "0"]  # sorting by the column reorders the rows
    page.select_option("#filters select[data-f='0']", "1")
    visible = "els => els.filter(e => !e.classList.contains('hidden')).map(e => e.id || e.children[1].textContent)"
    assert page.eval_on_selector_all("#runs tbody tr", visible) == ["1"]
    assert page.eval_on_selector_all("section.card", visible) == ["run1"]
    page.screenshot(path=str(tmp_path / "gallery.png"), full_page=True)
    assert (tmp_path / "gallery.png").stat().st_size > 10_000
