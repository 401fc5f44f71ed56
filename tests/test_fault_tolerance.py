"""Nothing the user made is lost: SIGTERM checkpoints, kill -9 never corrupts, NaNs are contained."""
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from helpers import TINY_TOY, compose_train, subprocess_env
from perpneg3d.errors import CheckpointError, NumericalError
from perpneg3d.training.checkpoint import (checkpoint_path, latest_valid_checkpoint, list_checkpoints, load_checkpoint,
                                           resolve_resume, save_checkpoint)
from perpneg3d.training.run import train

ROOT = Path(__file__).resolve().parents[1]
RUN = TINY_TOY + ["trainer.max_steps=150", "trainer.ckpt_every=1000", "trainer.log_every=1", "~export",
                  "evaluate_janus=false"]


def train_cli(args, **kw):
    env = subprocess_env(PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def test_sigterm_checkpoints_and_resume_is_exact(tmp_path):
    straight = train_cli(RUN + [f"out_dir={tmp_path}", "name=straight"])
    assert straight.wait(timeout=300) == 0, straight.stderr.read()
    killed = train_cli(RUN + [f"out_dir={tmp_path}", "name=killed"])
    progress = None
    deadline = time.time() + 240
    while time.time() < deadline:
        found = list((tmp_path / "killed").glob("*/progress.json"))
        if found and json.loads(found[0].read_text())["step"] >= 20:
            progress = found[0]
            break
        time.sleep(0.05)
    assert progress is not None, killed.stderr.read() if killed.poll() is not None else "no progress"
    killed.send_signal(signal.SIGTERM)
    out, err = killed.communicate(timeout=120)
    assert killed.returncode == 128 + signal.SIGTERM, err  # not finished, nobody requeued it: never looks done
    run_dir = progress.parent
    stopped_at = resolve_resume(str(run_dir))[2]["step"]
    assert 20 <= stopped_at < 150 and "resume with: python train.py resume=" in out
    resumed = train_cli(RUN + [f"out_dir={tmp_path}", f"resume={run_dir}"])
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read()
    a = latest_valid_checkpoint(next((tmp_path / "straight").iterdir()))[1]
    b = latest_valid_checkpoint(run_dir)[1]
    assert a["step"] == b["step"] == 150
    assert all(torch.equal(a["geometry"][k], b["geometry"][k]) for k in a["geometry"])


WRITER = r"""
import sys, torch
from perpneg3d.training.checkpoint import checkpoint_path, list_checkpoints, save_checkpoint, prune_checkpoints
run = sys.argv[1]
big = torch.randn(2_000_000, generator=torch.Generator().manual_seed(0))
done = list_checkpoints(run)
start = int(done[0].stem.split("_")[1]) + 1 if done else 1
for step in range(start, 10**6):
    state = dict(step=step, geometry={"w": big + step}, renderer={}, optimizer={}, generator=torch.zeros(1))
    save_checkpoint(state, checkpoint_path(run, step))
    prune_checkpoints(run, keep=2)
"""


def test_kill_9_during_checkpoint_writes_never_leaves_an_unreadable_checkpoint(tmp_path):
    env = subprocess_env()
    for attempt in range(8):
        before = len(list(tmp_path.glob("ckpts/*"))) and list_checkpoints(tmp_path)[0]
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path)], env=env)
        deadline = time.time() + 120
        while time.time() < deadline and (not list_checkpoints(tmp_path) or list_checkpoints(tmp_path)[0] == before):
            time.sleep(0.01)  # wait for this writer's first save ...
        time.sleep(0.013 + 0.047 * attempt)  # ... then kill it at varying points of a later write
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        paths = list_checkpoints(tmp_path)
        assert paths, "the writer should have saved something"
        big = torch.randn(2_000_000, generator=torch.Generator().manual_seed(0))
        for path in paths:  # every checkpoint under its final name is complete, with the values written
            state = load_checkpoint(path)
            assert torch.equal(state["geometry"]["w"], big + state["step"])
        step, state = latest_valid_checkpoint(tmp_path)[1]["step"], latest_valid_checkpoint(tmp_path)[1]
        assert state["geometry"]["w"].numel() == 2_000_000 and step >= 1


def test_corrupt_checkpoints(tmp_path):
    state = dict(step=3, geometry={}, renderer={}, optimizer={}, generator=torch.zeros(1))
    save_checkpoint(state, checkpoint_path(tmp_path, 3))
    checkpoint_path(tmp_path, 5).write_bytes(b"\x80\x02 truncated")  # newest one is garbage
    path, found = latest_valid_checkpoint(tmp_path)
    assert found["step"] == 3 and path == checkpoint_path(tmp_path, 3)
    with pytest.raises(CheckpointError, match=r"step_0000005.ckpt is unreadable .*resume from another file"):
        resolve_resume(str(checkpoint_path(tmp_path, 5)))
    with pytest.raises(CheckpointError, match="does not exist"):
        resolve_resume(str(tmp_path / "nope.ckpt"))
    torch.save({"hello": 1}, tmp_path / "foreign.ckpt")
    with pytest.raises(CheckpointError, match="not a perpneg3d checkpoint"):
        load_checkpoint(tmp_path / "foreign.ckpt")


def colour_prior_run(nan_calls, steps, tmp_path, streak):
    return compose_train(TINY_TOY + [
        "~guidance.denoiser", f"+guidance.denoiser={{_target_:external_prior.ColourPrior,resolution:16,nan_calls:{nan_calls}}}",
        "evaluate_janus=false", "~export", f"trainer.max_steps={steps}", f"trainer.max_nonfinite_steps={streak}"], tmp_path)


def test_transient_nan_steps_are_skipped_and_counted(tmp_path):
    run_dir = train(colour_prior_run(nan_calls=2, steps=6, tmp_path=tmp_path, streak=5))
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["nonfinite_steps"] == 2 and metrics["steps"] == 6


def test_persistent_nan_stops_with_the_last_good_state(tmp_path):
    cfg = colour_prior_run(nan_calls=-1, steps=50, tmp_path=tmp_path, streak=3)
    with pytest.raises(NumericalError, match=r"3 consecutive steps had NaN/inf .*last good state saved to") as err:
        train(cfg)
    assert "\n" not in str(err.value)
    run_dir = next((tmp_path / "toy").iterdir())
    _, state = latest_valid_checkpoint(run_dir)
    assert state["step"] == 3 and state["counters"]["nonfinite_steps"] == 3
    torch.manual_seed(0)  # the same initial weights as the run: no update was applied
    from perpneg3d.config import instantiate

    fresh = instantiate(cfg.geometry).state_dict()
    assert all(torch.equal(fresh[k], state["geometry"][k]) for k in fresh)
