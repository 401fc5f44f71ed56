"""The Janus benchmark: Wilson intervals, the paired comparison, and a tiny resumable end-to-end run."""
import csv
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from helpers import TINY_TOY, subprocess_env

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("bench_janus", ROOT / "scripts" / "bench_janus.py")
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)


def test_wilson_interval_hand_values():
    # k = 0: [0, z^2 / (n + z^2)]; k = n: [n / (n + z^2), 1]
    z2 = 1.959963984540054 ** 2
    assert bench.wilson(0, 18) == pytest.approx((0.0, z2 / (18 + z2)), abs=1e-9)
    assert bench.wilson(18, 18) == pytest.approx((18 / (18 + z2), 1.0), abs=1e-9)
    # k = 9 of 18: centred on 0.5, half-width z sqrt(p(1-p)/n + z^2/4n^2) / (1 + z^2/n)
    half = (z2 ** 0.5) * (0.25 / 18 + z2 / (4 * 18 ** 2)) ** 0.5 / (1 + z2 / 18)
    assert bench.wilson(9, 18) == pytest.approx((0.5 - half, 0.5 + half), abs=1e-9)


def test_a_methods_own_experiment_replaces_the_shared_one_and_composes():
    """experiment=toy_gs / toy_mv as a method: the shared experiment=toy is dropped (Hydra refuses a group twice),
    keys with a dot are left to the later value, and the runs' configs compose with the method's groups."""
    from perpneg3d.config import compose_config

    shared = ["experiment=toy", "trainer.progress=false", "~export", "guidance.neg_gain=1"]
    assert bench.method_run_overrides(shared, ["experiment=toy_mv"]) == [
        "trainer.progress=false", "~export", "guidance.neg_gain=1", "experiment=toy_mv"]
    assert bench.method_run_overrides(shared, ["guidance.neg_gain=2"]) == shared + ["guidance.neg_gain=2"]
    known = OmegaConf.load(ROOT / "configs" / "bench_janus.yaml").method_overrides
    for method, target in (("gs_x2", "GaussianCloud"), ("mv", "ImplicitVolume")):
        cfg = compose_config("train", bench.run_overrides("dog", 0, bench.method_run_overrides(shared, list(known[method]))))
        assert cfg.geometry._target_.endswith(target) and cfg.trainer.progress is False
    assert cfg.guidance.denoiser._target_.endswith("ToyMultiViewPrior") and cfg.cameras.views_per_group == 4


def test_paired_comparison_counts_fixes_and_breaks():
    def r(method, seed, ok):
        return dict(method=method, object="dog", seed=seed, janus_free=ok, oriented=ok, seconds_per_step=0.1)

    rows = [r("plain", 0, False), r("plain", 1, True), r("plain", 2, False),
            r("new", 0, True), r("new", 1, False), r("new", 2, True)]
    new = bench.summary(rows, ["plain", "new"], "plain")[1]
    assert (new["oriented"], new["oriented_fixes"], new["oriented_breaks"]) == (2, 2, 1)
    assert new["n"] == 3 and new["seconds_per_step"] == pytest.approx(0.1)


def test_tiny_benchmark_writes_its_tables_and_reuses_finished_runs(tmp_path):
    overrides = "[" + ",".join(f"'{o}'" for o in TINY_TOY + ["trainer.max_steps=4", "~export"]) + "]"
    args = [sys.executable, str(ROOT / "scripts" / "bench_janus.py"), "objects=[dog]", "seeds=[0,1]",
            "methods=[plain,perpneg]", "launcher=basic", f"overrides={overrides}", f"out_dir={tmp_path}"]
    first = subprocess.run(args, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    rows = list(csv.DictReader(open(tmp_path / "bench.csv")))
    assert [(r["method"], r["seed"]) for r in rows] == [("plain", "0"), ("plain", "1"), ("perpneg", "0"), ("perpneg", "1")]
    assert all(Path(r["run"]).is_dir() and (Path(r["run"]) / "janus_strip.png").is_file() for r in rows)
    import imageio.v3 as iio

    height, width = iio.imread(tmp_path / "montage.png").shape[:2]
    assert (height - 2) * 2 == (width - 2) * 8  # square tiles: 4 azimuths x 2 methods rows, 2 runs columns
    table = (tmp_path / "bench.md").read_text().splitlines()
    free = sum(r["janus_free"] == "True" for r in rows if r["method"] == "perpneg")
    assert table[2].startswith("| plain | ") and table[3].startswith(f"| perpneg | {free}/2 (")
    again = subprocess.run(args, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("all 2 runs reused") == 2


def test_a_run_made_with_other_method_overrides_is_not_reused(tmp_path):
    """A finished run is reused only if its config.yaml is what the method asks for now."""
    from omegaconf import OmegaConf

    from perpneg3d.config import compose_config
    from perpneg3d.errors import ConfigError

    folder = tmp_path / "perpneg_x2" / "dog" / "0"
    folder.mkdir(parents=True)
    made = bench.run_overrides("dog", 0, ["experiment=toy", "guidance.neg_gain=1"])
    (folder / "config.yaml").write_text(OmegaConf.to_yaml(compose_config("train", made), resolve=True))
    bench.check_reusable(folder, "perpneg_x2", made + ["trainer.progress=false"])  # a safe key may differ
    with pytest.raises(ConfigError) as err:
        bench.check_reusable(folder, "perpneg_x2", bench.run_overrides("dog", 0, ["experiment=toy", "guidance.neg_gain=2"]))
    assert str(err.value) == (f"{folder} was trained with guidance.neg_gain=1, but method perpneg_x2 now sets "
                              "guidance.neg_gain=2: move or delete that folder, or use another out_dir")


def test_world_selects_the_toy_priors_objects():
    """world=[...] trains in another toy world (the held-out objects'); null keeps the preset's."""
    from perpneg3d.config import compose_config

    assert bench.world_overrides(None) == []
    cfg = compose_config("train", ["experiment=toy", *bench.world_overrides(["horse", "rabbit", "cat:ginger"])])
    assert list(cfg.guidance.denoiser.dataset.objects) == ["horse", "rabbit", "cat:ginger"]
