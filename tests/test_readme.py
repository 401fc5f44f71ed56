"""README is executable: every shell command in its code blocks (and in docs/*.md's) runs here (offline, CPU,
with a short step count where it trains) or is in SKIPPED with the reason. A command added to README is then
tested, or skipped on purpose; a command in SKIPPED that README no longer has fails the test too."""
from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from helpers import TINY_GAUSSIANS, TINY_TOY, subprocess_env

ROOT = Path(__file__).resolve().parents[1]

# command (as README writes it, comments removed) -> why it does not run here
SKIPPED = {
    "make test": "it is this test suite (CI runs it)",
    "make demo": "trains the 1000-step preset; its command, `python train.py experiment=toy`, runs here with a short "
                 "step count (RUN_INSTEAD)",
    "python -m venv .venv && . .venv/bin/activate": "GPU set-up: would replace the test environment",
    "pip install torch --index-url https://download.pytorch.org/whl/cu124": "GPU set-up: a CUDA torch, needs network",
    'pip install -e ".[test,gsplat]" && pip install --no-deps clip-anytorch': "what `make install` does; the suite "
                                                                                 "runs in it",
    'pip install -e ".[gsplat]"': "part of `make install` (the gsplat extra); the suite runs in it",
    "python -m perpneg3d.renderer.gsplat_rasterizer --build": "compiles CUDA kernels: needs nvcc and a GPU (or "
                                                              "--without-device); make gpu-rehearsal builds them",
    'python train.py experiment=gs prompt="a corgi standing"': "Stable Diffusion's weights; tests/test_gaussians.py "
                                                                 "trains experiment=gs on a tiny random SD",
    "pip install git+https://github.com/NVlabs/tiny-cuda-nn/#subdirectory=bindings/torch": "needs nvcc and network",
    "make gpu-check PYTHON=python": "needs a CUDA GPU; its CPU mode runs in tests/test_cuda_path.py",
    'python train.py prompt="a corgi standing"': "needs Stable Diffusion's weights from the hub",
    "python -m pip list --format=freeze > node-packages.txt": "run on the GPU node",
    "make wheelhouse NODE_PACKAGES=node-packages.txt": "downloads wheels; make gpu-rehearsal runs it against "
                                                       "gpu/node-packages.txt, tests/test_cuda_path.py its resolution",
    "bash scripts/gpu_node.sh gpu_out": "needs the wheelhouse and a GPU; make gpu-rehearsal runs it in CPU mode",
    'python train.py prompt="a westie" seed=3 guidance.guidance_scale=75 trainer.max_steps=5000': "Stable Diffusion",
    'python train.py prompt="a corgi standing" prompts=plain': "Stable Diffusion",
    'python train.py prompt="a corgi standing" prompts/schedule=stable_dreamfusion': "Stable Diffusion",
    "python train.py '~guidance.denoiser' '+guidance.denoiser={_target_:my_pkg.MyPrior,resolution:64}'":
        "my_pkg is the user's package; the same override with tests/external_prior.py runs in tests/test_training.py",
    "python train.py -m 'prompt=\"a corgi standing\",\"a westie\"' seed=0,1,2 hydra/launcher=submitit_slurm "
    "hydra.launcher.partition=gpu hydra.launcher.timeout_min=240": "Stable Diffusion on a GPU partition; the SLURM "
                                                                  "path runs on a local cluster in tests/test_slurm.py",
    "python scripts/bench_tet_grid.py outputs/toy/<timestamp>": "grids of 128 and 256 cells take tens of minutes on 2 "
                                                                "cores; tests/test_scripts.py runs it at 12",
    "python -m perpneg3d.renderer.nerfacc_cuda --build": "compiles CUDA kernels: needs nvcc and CUDA's headers; "
                                                         "make gpu-rehearsal builds them with pip's toolkit",
    "python scripts/gpu_check.py --device cpu --tiny --out /tmp/check": "tests/test_gpu_check.py runs this check "
                                                                         "(about 100 s) and asserts its report",
    "python scripts/convert_mvdream.py checkpoint=sd-v2.1-base-4view.pt out=models/mvdream-sd21":
        "needs MVDream's checkpoint from the hub; tests/test_mvdream_convert.py runs the script on an ldm checkpoint "
        "written from MVDream's model code",
    "python train.py guidance=mvdream guidance.denoiser.pretrained_model_name_or_path=models/mvdream-sd21 "
    "cameras.views_per_group=4 cameras.batch_size=4 prompts=plain 'prompts.template=\"{prompt}\"' "
    "prompt=\"a corgi standing\"": "MVDream's weights; tests/test_mvdream.py trains the same path on a tiny random "
                                    "MVDream folder",
    "python scripts/slurm_local.py start": "tests/test_slurm.py starts the same cluster (slurm_local.start)",
    "export SLURM_CONF=/tmp/perpneg3d-slurm/slurm.conf": "tests/test_slurm.py sets SLURM_CONF for its commands",
    "python train.py -m seed=0,1 experiment=toy hydra/launcher=submitit_slurm hydra.launcher.partition=debug "
    "hydra.launcher.cpus_per_task=1 hydra.launcher.gpus_per_node=0 hydra.launcher.mem_gb=4":
        "needs the local cluster; tests/test_slurm.py::test_two_job_toy_sweep runs this sweep on it",
    "python scripts/slurm_local.py stop": "tests/test_slurm.py stops its cluster and checks the daemons are gone",
    'python scripts/sample_2d.py prompt="a corgi standing" view=back mode=perpneg view_negative_weight=2':
        "Stable Diffusion",
    "python scripts/sample_2d.py prompt=\"a corgi\" view=null 'negative_prompts=[\"a corgi, front view\"]' "
    "negative_weights=[1.5]": "Stable Diffusion",
}
RUN_INSTEAD = {"make demo": "python train.py experiment=toy"}

# heavy values replaced by light ones (the command is otherwise run as written)
LIGHTER = [(r"trainer\.max_steps=\d+", "trainer.max_steps=8"), (r"export\.resolution=\d+", "export.resolution=32"),
           (r"num_samples=\d+", "num_samples=2")]
TINY = [o for o in TINY_TOY if o != "experiment=toy"] + ["trainer.turntable_frames=2"]
# the refine stage's tiny settings (its geometry is a DMTet: the first stage's hash-grid keys do not apply)
REFINE_TINY = ["geometry.grid_resolution=16", "trainer.max_steps=3", "trainer.val_every=3", "trainer.val_resolution=16",
               "trainer.turntable_frames=2", "trainer.turntable_resolution=16", "trainer.progress=false",
               "export.texture_size=64"]


def readme_commands() -> list[str]:
    """Every command of the ```bash blocks of README and docs/*.md, once: continuation lines joined, comments
    dropped."""
    commands = []
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        block = None
        for line in page.read_text().splitlines():
            if line.startswith("```"):
                block = [] if line.strip() == "```bash" and block is None else None
                continue
            if block is None:
                continue
            text = re.sub(r"\s+#\s.*$", "", line).strip()
            if not text or text.startswith("#"):
                continue
            if commands and commands[-1].endswith("\\"):
                commands[-1] = commands[-1][:-1].rstrip() + " " + text
            else:
                commands.append(text)
    return list(dict.fromkeys(commands))


COMMANDS = readme_commands()


def test_every_skipped_command_is_still_in_readme():
    assert set(SKIPPED) <= set(COMMANDS), sorted(set(SKIPPED) - set(COMMANDS))


@pytest.fixture(scope="module")
def places(tmp_path_factory):
    """A finished tiny toy run and a finished two-job sweep, for the commands' placeholders."""
    out = tmp_path_factory.mktemp("readme")
    run = subprocess.run([sys.executable, "train.py", "experiment=toy", *TINY, "trainer.keep_checkpoints=5",
                          f"out_dir={out}", "name=toy"], cwd=ROOT, env=subprocess_env(), capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    sweep = subprocess.run([sys.executable, "train.py", "-m", "seed=0,1", "experiment=toy", *TINY, f"out_dir={out}",
                            f"hydra.sweep.dir={out}/multirun/sweep"], cwd=ROOT, env=subprocess_env(), capture_output=True,
                           text=True, timeout=600)
    assert sweep.returncode == 0, sweep.stderr[-2000:]
    return dict(out=out, run=next((out / "toy").iterdir()), sweep=out / "multirun" / "sweep")


def offline(command: str, places: dict) -> str:
    """README's command as it runs here: placeholders filled, heavy values lightened, outputs in a
    temporary folder, and the tiny settings appended where it trains."""
    command = RUN_INSTEAD.get(command, command)
    command = command.replace("outputs/toy/<timestamp>/ckpts/step_0000500.ckpt",
                              f"{places['run']}/ckpts/step_0000003.ckpt")
    command = command.replace("outputs/toy/<timestamp>", str(places["run"]))
    command = command.replace("outputs/multirun/<timestamp>", str(places["sweep"]))
    for pattern, light in LIGHTER:
        command = re.sub(pattern, light, command)
    words = shlex.split(command)
    out = places["out"]
    if words[:2] == ["python", "train.py"] and any(w.startswith("refine=") for w in words):
        command += " " + " ".join(REFINE_TINY) + f" out_dir={out}"
    elif words[:2] == ["python", "train.py"] and not any(w.startswith("-") and w != "-m" for w in words[2:]):
        tiny = [o for o in TINY_GAUSSIANS if o != "experiment=toy_gs"] if "experiment=toy_gs" in words \
            else TINY
        if not any(w.startswith("resume=") for w in words):
            command += " " + " ".join(shlex.quote(o) for o in tiny) + f" out_dir={out}"
        if "then_refine=true" in words:  # one job of the sweep: a two-job sweep runs in the commands around it
            command = command.replace("seed=0,1 ", "seed=0 ")
            command += " " + shlex.quote("refine_overrides=[" + ",".join(f'"{o}"' for o in REFINE_TINY) + "]")
    elif words[:2] == ["python", "scripts/sample_2d.py"]:
        command += f" steps=3 out_dir={out}/sample_2d guidance.denoiser.dataset.num_images=300"
    elif words[:2] == ["python", "scripts/eval_view_fidelity.py"]:
        command += f" preset=small out_dir={out}/fidelity"
    elif words[:2] == ["python", "scripts/bench_refine.py"]:
        tiny = "[" + ",".join(f"'{o}'" for o in ["experiment=toy", *TINY]) + "]"
        stage = "[" + ",".join(f"'{o}'" for o in REFINE_TINY) + "]"
        command += (f" objects=[dog] seeds=[0] {shlex.quote('overrides=' + tiny)} "
                    f"{shlex.quote('refine_overrides=' + stage)} out_dir={out}/bench_refine")
    elif words[:2] == ["python", "scripts/diagnose_janus.py"]:
        tiny = "[" + ",".join(f"'{o}'" for o in ["experiment=toy", *TINY]) + "]"
        command += (" objects=[cat] classifier_views=6 reconstruct_steps=3 'layout_runs=[\"cat:0\"]' layout_steps=2 "
                    f"layout_every=1 {shlex.quote('overrides=' + tiny)} out_dir={out}/diagnose")
    elif words[:2] == ["python", "scripts/bench_janus.py"]:
        tiny = "[" + ",".join(f"'{o}'" for o in ["experiment=toy", *TINY, "~export"]) + "]"
        lists = {w.split("=", 1)[0]: w for w in words if w.startswith(("world=", "methods="))}
        world = lists["world"].split("=", 1)[1].strip("[]").split(",") if "world" in lists else ["dog"]
        if "methods" in lists:  # every method named must exist; the last one (the newest) is the one run, to keep CI short
            methods = lists["methods"].split("=", 1)[1].strip("[]").split(",")
            known = OmegaConf.load(ROOT / "configs" / "bench_janus.yaml").method_overrides
            assert set(methods) <= set(known), sorted(set(methods) - set(known))
            command = command.replace(lists["methods"], f"methods=[{methods[-1]}]")
        command += (f" objects=[{world[0]}] seeds=[0] launcher=basic {shlex.quote('overrides=' + tiny)} "
                    f"out_dir={out}/bench_{world[0]}")
    return command


RUNNABLE = [c for c in COMMANDS if c not in SKIPPED or c in RUN_INSTEAD]


@pytest.mark.parametrize("command", RUNNABLE)
def test_readme_command_runs(command, places):
    env = subprocess_env()
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])  # `python` is this one
    line = offline(command, places)
    done = subprocess.run(["bash", "-c", line], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{line}\n{done.stderr[-3000:]}"
    assert "Traceback" not in done.stderr
    if "--cfg job" in command:
        assert "prompt:" in done.stdout
    if "collect_sweep.py" in command:
        assert (places["sweep"] / "sweep.md").is_file()
    if command.startswith("python train.py resume="):
        assert json.loads((places["run"] / "metrics.json").read_text())["steps"] >= 6


def test_the_config_printing_commands_are_run_not_skipped():
    assert {"python train.py --cfg job", "python train.py guidance=if --cfg job"} <= set(RUNNABLE)
