"""Bad input gets one line naming the value and the fix, never a traceback."""
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import TINY_TOY, compose_train, subprocess_env
from perpneg3d.config import check_overrides
from perpneg3d.errors import ConfigError, OutputDirError, PerpNegError
from perpneg3d.training.run import train

ROOT = Path(__file__).resolve().parents[1]


def run_cli(script, *args):
    env = subprocess_env()
    return subprocess.run([sys.executable, str(ROOT / script), *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.parametrize("args, message", [
    (["experiment=toy", "prompt="], "prompt is empty"),
    (["trainer.max_step=5"], "unknown config key 'trainer.max_step'"),
    (["guidance=sd3"], "unknown guidance 'sd3': choose one of if, mvdream, sd15, sd21, toy, toy_mv, toy_one_object"),
    (["hydra/launcher=slurmm"], "unknown hydra/launcher 'slurmm': choose one of"),
    (["guidance=sd21", "guidance.denoiser.pretrained_model_name_or_path=/no/such/model"],
     "cannot load Stable Diffusion '/no/such/model'"),
    (["experiment=toy", "export.formats=[fbx]"], "export.formats=['fbx']: choose from glb, obj, ply"),
    # the small toy dataset (cached by other tests): these errors come when the guidance is built, after its prior
    (["experiment=toy", "guidance.denoiser.dataset.num_images=300", "guidance.mode=perp"], "guidance.mode='perp' is unknown: use one of cfg, negprompt, cebm, perpneg"),
    (["experiment=toy", "guidance.denoiser.dataset.num_images=300", "guidance.mode=cfg"], "guidance.neg_gain=2.0 has no effect with guidance.mode=cfg"),
    (["--cfg", "job", "trainer.max_stepz=3"], "unknown config key 'trainer.max_stepz'"),
])
def test_train_cli_errors_are_one_line(args, message, tmp_path):
    proc = run_cli("train.py", *args, f"out_dir={tmp_path}")
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and message in last


def test_corrupt_resume_checkpoint_cli(tmp_path):
    bad = tmp_path / "ckpts" / "step_0000010.ckpt"
    bad.parent.mkdir()
    bad.write_bytes(b"not a checkpoint")
    proc = run_cli("train.py", "experiment=toy", f"resume={bad}")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "is unreadable" in proc.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize("override, message", [
    ("+geometry.foo=1", "config key geometry.foo is not an argument of perpneg3d.geometry.implicit_volume.ImplicitVolume: "
                        "remove it or use one of radius, n_levels"),
    ("+guidance.denoiser.text_encoder.dims=8", "config key guidance.denoiser.text_encoder.dims is not an argument"),
    ("prompt=a teapot", "names no object the toy prior knows"),
])
def test_bad_keys_and_prompts_in_process(override, message, tmp_path):
    with pytest.raises(PerpNegError) as err:
        train(compose_train(TINY_TOY + [override], tmp_path))
    assert message in str(err.value) and "\n" not in str(err.value)


def test_unwritable_output_folder(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(OutputDirError, match=r"cannot create output folder .*a_file/sub.*choose another"):
        train(compose_train(TINY_TOY + [], blocker / "sub"))


def test_sweep_overrides_are_checked_too():
    check_overrides("train", ["-m", "seed=0,1,2", "prompts.perp_neg=true,false", "hydra/launcher=submitit_local"])
    with pytest.raises(ConfigError, match="unknown config key 'sed'"):
        check_overrides("train", ["-m", "sed=0,1"])


def test_sample_2d_cli_errors(tmp_path):
    proc = run_cli("scripts/sample_2d.py", "guidance=toy", "prompt=a toy dog", 'negative_prompts=["a toy dog, front view"]',
                   "negative_weights=[1,2]", f"out_dir={tmp_path}")
    assert proc.returncode == 2 and "negative_weights has 2 values for 1 negative_prompts" in proc.stderr
    proc = run_cli("scripts/sample_2d.py", "guidance=toy", "mode=perpendicular", f"out_dir={tmp_path}")
    assert proc.returncode == 2 and "mode='perpendicular' is unknown" in proc.stderr
