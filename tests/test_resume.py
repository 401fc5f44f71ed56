"""Resume rebuilds a run from its own config.yaml; Ctrl-C checkpoints and says how to resume."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from helpers import TINY_TOY, compose_train, subprocess_env
from perpneg3d.config import compose_config
from perpneg3d.errors import ConfigError
from perpneg3d.training.checkpoint import latest_valid_checkpoint
from perpneg3d.training.preemption import PreemptionHandler
from perpneg3d.training.resume_config import requeued_config, resumed_config

ROOT = Path(__file__).resolve().parents[1]


def compose(overrides):
    return compose_config("train", overrides)


@pytest.fixture
def saved_run(tmp_path):
    """A run folder whose config.yaml is a toy run with a non-default guidance scale."""
    run = tmp_path / "run"
    run.mkdir()
    cfg = compose_train(TINY_TOY + ["guidance.guidance_scale=7.5"], tmp_path)
    (run / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    return run


def resume(run, *overrides):
    args = [f"resume={run}", *overrides]
    return resumed_config(compose(args), run, args, compose)


def test_resume_uses_the_runs_config_not_the_defaults(saved_run):
    cfg = resume(saved_run, "trainer.max_steps=9")
    assert cfg.guidance.denoiser._target_ == "perpneg3d.toy.prior.ToyPrior"  # the defaults would load Stable Diffusion
    assert cfg.guidance.guidance_scale == 7.5 and cfg.geometry.n_levels == 4 and cfg.prompt == "a toy dog"
    assert cfg.trainer.max_steps == 9 and cfg.resume == str(saved_run)


def test_repeating_the_runs_own_overrides_changes_nothing(saved_run):
    cfg = resume(saved_run, *TINY_TOY, "guidance.guidance_scale=7.5")
    saved = OmegaConf.load(saved_run / "config.yaml")
    assert OmegaConf.to_container(cfg) == dict(OmegaConf.to_container(saved), resume=str(saved_run))


@pytest.mark.parametrize("override, key, value, was", [
    ("guidance.guidance_scale=100", "guidance.guidance_scale", "100", "7.5"),  # the default value is still a change
    ("prompt=a cat", "prompt", "'a cat'", "'a toy dog'"),
    ("seed=1", "seed", "1", "0"),
    ("geometry.n_levels=6", "geometry.n_levels", "6", "4"),
    ("guidance=sd21", "guidance.denoiser._target_", "'perpneg3d.guidance.stable_diffusion.StableDiffusion'",
     "'perpneg3d.toy.prior.ToyPrior'"),
    ("prompts/schedule=stable_dreamfusion", "prompts.schedule._target_", None, None),
])
def test_identity_overrides_are_refused_in_one_line(saved_run, override, key, value, was):
    with pytest.raises(ConfigError) as err:
        resume(saved_run, override)
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"resume={saved_run}: {key}=")
    if value is not None:
        assert f"{key}={value} would change the run, which has {key}={was}" in message
    assert "start a new run (without resume=)" in message


def test_safe_overrides_apply_and_removing_the_export_is_safe(saved_run):
    cfg = resume(saved_run, "trainer.max_steps=20", "trainer.ckpt_every=5", "export.resolution=64")
    assert cfg.trainer.max_steps == 20 and cfg.trainer.ckpt_every == 5 and cfg.export.resolution == 64
    assert "export" not in resume(saved_run, "~export")


def test_a_config_built_in_python_is_compared_whole(saved_run):
    cfg = compose(TINY_TOY + ["guidance.guidance_scale=7.5", "trainer.max_steps=12", f"resume={saved_run}"])
    assert resumed_config(cfg, saved_run, None).trainer.max_steps == 12
    cfg = compose(TINY_TOY + [f"resume={saved_run}"])  # guidance scale back to the toy preset's 20
    with pytest.raises(ConfigError, match=r"guidance.guidance_scale=20.0 would change the run, which has "
                                          r"guidance.guidance_scale=7.5"):
        resumed_config(cfg, saved_run, None)


def test_a_requeued_job_refuses_configs_changed_under_it(saved_run):
    same = compose(TINY_TOY + ["guidance.guidance_scale=7.5", "trainer.max_steps=12"])
    assert requeued_config(same, saved_run).trainer.max_steps == 12
    edited = compose(TINY_TOY + ["guidance.guidance_scale=7.5", "cameras.fovy_range=[30,40]"])
    with pytest.raises(ConfigError, match=r"^requeued job .*: cameras.fovy_range=\[30, 40\] would change the run.*"
                                          r"restore them, or start a new sweep$"):
        requeued_config(edited, saved_run)


def test_a_folder_without_config_yaml_is_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"has no config.yaml, so its run cannot be rebuilt"):
        resume(tmp_path, "trainer.max_steps=3")


def train_cli(args):
    return subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args], cwd=ROOT,
                            env=subprocess_env(PYTHONUNBUFFERED="1"), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def wait_for_step(folder: Path, step: int, proc, timeout=240) -> Path:
    deadline = time.time() + timeout
    while time.time() < deadline:
        found = list(folder.glob("*/progress.json"))
        if found and json.loads(found[0].read_text())["step"] >= step:
            return found[0].parent
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.05)
    raise AssertionError("no progress")


def test_ctrl_c_checkpoints_exits_130_and_the_printed_command_resumes(tmp_path):
    """Ctrl-C: finish the step, checkpoint, print the resume command, exit 130. The printed command,
    run as printed (no experiment=toy), continues the toy run with its own guidance scale."""
    run = TINY_TOY + ["trainer.max_steps=400", "trainer.ckpt_every=1000", "trainer.log_every=1", "~export",
                      "evaluate_janus=false", "guidance.guidance_scale=7.5", f"out_dir={tmp_path}", "name=ctrlc"]
    proc = train_cli(run)
    run_dir = wait_for_step(tmp_path / "ctrlc", 5, proc)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    stopped = latest_valid_checkpoint(run_dir)
    assert stopped is not None and 5 <= stopped[1]["step"] < 400  # nothing since step 0 lost
    printed = [line for line in out.splitlines() if "resume with: python train.py " in line]
    assert printed == [f"interrupted: checkpoint saved; resume with: python train.py resume={run_dir}"]
    command = printed[0].split("python train.py ")[1].split()
    resumed = train_cli(command + [f"trainer.max_steps={stopped[1]['step'] + 3}"])
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err[-2000:]
    assert latest_valid_checkpoint(run_dir)[1]["step"] == stopped[1]["step"] + 3
    saved = OmegaConf.load(run_dir / "config.yaml")
    assert saved.guidance.guidance_scale == 7.5 and saved.guidance.denoiser._target_.endswith("ToyPrior")


def test_a_second_ctrl_c_exits_at_once():
    with PreemptionHandler() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)
        assert stop.requested and stop.signum == signal.SIGINT  # the first one only asks for a checkpoint
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)


def test_ctrl_c_during_start_up_is_one_line(tmp_path):
    proc = train_cli(TINY_TOY + [f"out_dir={tmp_path}"])
    # train.py installs its Ctrl-C handler before it imports torch: once torch's library is mapped,
    # start-up is under way (on a loaded machine a fixed delay could land before Python runs train.py)
    maps = Path(f"/proc/{proc.pid}/maps")
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and "libtorch" not in maps.read_text():
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-2000:]
    assert err.strip().splitlines()[-1] == "interrupted (Ctrl-C)" and "Traceback" not in err


@pytest.mark.parametrize("script, outcome", [("kill -TERM $$", SystemExit), ("exit 1", subprocess.CalledProcessError)])
def test_a_requeue_stopped_by_slurms_own_sigterm_still_exits_for_the_requeue(tmp_path, monkeypatch, script, outcome):
    """submitit's SLURM handler runs `scontrol requeue <job>`; SLURM then SIGTERMs the job's processes, and on a busy
    controller that reaches scontrol before it exits (seen in CI). The hand-over ends the job as after a requeue;
    scontrol failing on its own is still an error."""
    (tmp_path / "scontrol").write_text(f"#!/bin/sh\n{script}\n")
    (tmp_path / "scontrol").chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    requeued = []

    def submitit_like(signum, frame):
        requeued.append(signum)
        subprocess.check_call(["scontrol", "requeue", "3"], timeout=60)

    before = signal.signal(signal.SIGUSR2, submitit_like)
    try:
        with PreemptionHandler() as stop:
            os.kill(os.getpid(), signal.SIGUSR2)
            time.sleep(0.05)
            assert stop.signum == signal.SIGUSR2 and not requeued  # ours only asks for a checkpoint first
            with pytest.raises(outcome) as raised:
                stop.hand_over()
        assert requeued == [signal.SIGUSR2]
        if outcome is SystemExit:
            assert raised.value.code == -1  # what submitit's own exit after a requeue raises
        assert signal.getsignal(signal.SIGUSR2) is submitit_like  # the hand-over restored it
    finally:
        signal.signal(signal.SIGUSR2, before)
