"""Runs users can trust (part 2): Hydra's flags, resume across devices and from older checkpoints, an
export refused after training, one process per run folder, plain progress lines in log files."""
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from helpers import TINY_TOY, compose_train, subprocess_env
from perpneg3d.config import check_overrides
from perpneg3d.errors import ConfigError, ExportError, OutputDirError
from perpneg3d.geometry.hash_grid import HashGridEncoding
from perpneg3d.random_streams import RandomStreams
from perpneg3d.run_dir import RunLock, write_atomic
from perpneg3d.training.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
from perpneg3d.training.progress import Progress
from perpneg3d.training.run import train

ROOT = Path(__file__).resolve().parents[1]
SHORT = TINY_TOY + ["~export", "evaluate_janus=false"]


def cli(*args, timeout=300):
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=ROOT, env=subprocess_env(),
                          capture_output=True, text=True, timeout=timeout)


# -- 1. Hydra's flags and their values ------------------------------------------------------------

@pytest.mark.parametrize("argv", [
    ["--cfg", "job"], ["-c", "job"], ["--cfg", "hydra"], ["guidance=if", "--cfg", "job"], ["-p", "trainer", "--cfg", "job"],
    ["-cn", "train", "--cfg", "job"], ["--config-name", "train", "-c", "all"], ["--info", "config"],
    ["--resolve", "--cfg", "job", "experiment=toy"], ["-m", "--cfg", "job", "seed=0,1"],
])
def test_hydra_flags_and_their_values_pass_the_pre_check(argv):
    check_overrides("train", argv)  # raised "Error parsing override 'job'" before


def test_the_pre_check_still_reads_the_overrides_after_a_flag():
    with pytest.raises(ConfigError, match="unknown config key 'trainer.max_stepz'"):
        check_overrides("train", ["--cfg", "job", "trainer.max_stepz=3"])


@pytest.mark.parametrize("argv, expect", [
    (["--cfg", "job"], "_target_: perpneg3d.guidance.stable_diffusion.StableDiffusion"),
    (["guidance=if", "--cfg", "job"], "_target_: perpneg3d.guidance.deepfloyd_if.DeepFloydIF"),
])
def test_cfg_job_prints_the_config(argv, expect):
    proc = cli(*argv)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert expect in proc.stdout and "prompt: a corgi standing" in proc.stdout


# -- 2. resume on another device -------------------------------------------------------------------

def test_a_tcnn_checkpoint_loads_into_the_torch_grid_and_back():
    torch.manual_seed(0)
    grid = HashGridEncoding(n_levels=4, log2_hashmap_size=10, finest_resolution=32, implementation="torch")
    state = grid.state_dict()
    table = state.pop("encoding.embeddings")
    tcnn_state = dict(state, **{"encoding.params": table.flatten().clone()})  # tiny-cuda-nn's flat layout
    other = HashGridEncoding(n_levels=4, log2_hashmap_size=10, finest_resolution=32, implementation="torch")
    other.load_state_dict(tcnn_state)
    assert torch.equal(other.encoding.embeddings, table)
    x = torch.rand(64, 3)
    assert torch.equal(other(x), grid(x))


def test_a_cuda_random_state_resumes_on_cpu_deterministically():
    cuda_like = dict(RandomStreams.seeded(3).state_dict(), device=torch.arange(16, dtype=torch.uint8),
                     device_type="cuda")  # a Philox state: 16 bytes
    draws = []
    for _ in range(2):
        streams = RandomStreams.seeded(0)
        streams.load_state_dict(cuda_like)
        draws.append(torch.rand(4, generator=streams.device))
    assert torch.equal(draws[0], draws[1])
    assert not torch.equal(draws[0], torch.rand(4, generator=RandomStreams.seeded(0).device))


def test_resume_of_a_checkpoint_written_with_tcnn_on_cuda(tmp_path):
    """The checkpoint a CUDA run writes (tcnn's flat table, its Adam moments, a Philox device state),
    resumed on the CPU: no traceback, the table and moments carried over."""
    run = train(compose_train(SHORT, tmp_path))
    path = list_checkpoints(run)[0]
    state = load_checkpoint(path)
    key = next(k for k in state["geometry"] if k.endswith("encoding.encoding.embeddings"))
    table = state["geometry"].pop(key)
    state["geometry"][key.replace("embeddings", "params")] = table.flatten()
    for slots in state["optimizer"]["state"].values():
        for name, value in list(slots.items()):
            if torch.is_tensor(value) and value.shape == table.shape:
                slots[name] = value.flatten()
    state["generator"].update(device=torch.arange(16, dtype=torch.uint8), device_type="cuda")
    save_checkpoint({k: v for k, v in state.items() if k != "format"}, path)
    train(compose_train(SHORT + [f"resume={run}", "trainer.max_steps=8"], tmp_path))
    assert load_checkpoint(list_checkpoints(run)[0])["step"] == 8


# -- 3. resume from an older checkpoint: one history ----------------------------------------------

def final_table(run: Path, checkpoint: Path | None = None) -> torch.Tensor:
    state = load_checkpoint(checkpoint or list_checkpoints(run)[0])
    return next(v for k, v in state["geometry"].items() if k.endswith("embeddings"))


def test_resume_from_an_older_checkpoint_sets_the_later_history_aside(tmp_path):
    base = SHORT + ["trainer.max_steps=9", "trainer.ckpt_every=3", "trainer.keep_checkpoints=1"]
    straight = train(compose_train(base + ["name=straight"], tmp_path))
    run = train(compose_train(base + ["name=old", "trainer.keep_checkpoints=3"], tmp_path))
    old = {p.name: p.read_bytes() for p in list_checkpoints(run)}
    assert sorted(old) == ["step_0000003.ckpt", "step_0000006.ckpt", "step_0000009.ckpt"]
    train(compose_train(base + [f"resume={run}/ckpts/step_0000003.ckpt", "trainer.keep_checkpoints=1"], tmp_path))
    # keep=1 keeps the checkpoint this history wrote, not the abandoned 9
    assert [p.name for p in list_checkpoints(run)] == ["step_0000009.ckpt"]
    aside = list((run / "abandoned").glob("step_0000003_*"))
    assert len(aside) == 1
    assert {p.name: p.read_bytes() for p in (aside[0] / "ckpts").iterdir()} == \
        {k: v for k, v in old.items() if k != "step_0000003.ckpt"}
    assert sorted(p.name for p in (aside[0] / "val").iterdir()) == ["step_0000006.png", "step_0000009.png"]
    assert torch.equal(final_table(run), final_table(straight))  # one continuous history, exact on CPU


def test_a_missing_resume_target_names_itself(tmp_path):
    from perpneg3d.errors import CheckpointError

    with pytest.raises(CheckpointError) as err:
        train(compose_train(SHORT + [f"resume={tmp_path}/no/such/step_0000003.ckpt"], tmp_path))
    assert str(err.value) == (f"checkpoint {tmp_path}/no/such/step_0000003.ckpt does not exist: pass a run folder or a "
                              "file from its ckpts/")


def test_max_steps_below_the_checkpoint_is_refused(tmp_path):
    run = train(compose_train(SHORT, tmp_path))
    with pytest.raises(ConfigError) as err:
        train(compose_train(SHORT + [f"resume={run}", "trainer.max_steps=3"], tmp_path))
    assert str(err.value) == (f"trainer.max_steps=3 is below the checkpoint's step 6 ({run}/ckpts/step_0000006.ckpt): "
                              "resume with trainer.max_steps=6 or more, or from an earlier checkpoint")


def test_older_checkpoint_then_ctrl_c_then_resume_is_one_history(tmp_path):
    """The issue's scenario from the command line: resume from step 3 of a finished run, Ctrl-C, resume
    the folder as printed: it ends at max_steps with the uninterrupted run's weights (its own first history, set
    aside with the abandoned checkpoints)."""
    base = SHORT + ["trainer.max_steps=100", "trainer.ckpt_every=3", "trainer.keep_checkpoints=1000", "trainer.log_every=1", f"out_dir={tmp_path}"]
    first = cli(*base, "name=run")
    run = next((tmp_path / "run").iterdir())
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), f"resume={run}/ckpts/step_0000003.ckpt"],
                            cwd=ROOT, env=subprocess_env(PYTHONUNBUFFERED="1"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert first.returncode == 0
    deadline = time.time() + 240
    while time.time() < deadline and not 10 <= json.loads((run / "progress.json").read_text())["step"] < 100:
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert f"the later checkpoints and validation images were moved to {run}/abandoned/step_0000003_" in out
    again = cli(f"resume={run}")
    assert again.returncode == 0, again.stderr[-2000:]
    aside = next((run / "abandoned").iterdir())
    assert sorted(p.name for p in (aside / "ckpts").iterdir())[-1] == "step_0000100.ckpt"
    assert torch.equal(final_table(run), final_table(run, aside / "ckpts" / "step_0000100.ckpt"))


# -- 4. an export refused after training ----------------------------------------------------------

def test_an_export_refused_for_memory_keeps_the_summary_and_says_how_to_retry(tmp_path, monkeypatch):
    import psutil

    from perpneg3d.export.mesh import BASE_BYTES, estimate_peak_bytes

    free = estimate_peak_bytes(128) - BASE_BYTES  # 128^3 fits, 192^3 does not
    monkeypatch.setattr(psutil, "virtual_memory", lambda: type("Mem", (), {"available": free})())
    cfg = compose_train(TINY_TOY + ["evaluate_janus=false", "export.resolution=192", "name=refused"], tmp_path)
    with pytest.raises(ExportError) as err:
        train(cfg)
    run = next((tmp_path / "refused").iterdir())
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["steps"] == 6 and "mesh" not in metrics
    message = str(err.value)
    assert message.startswith("training finished and metrics.json is written, but the export failed: "
                              "export.resolution=192 with texture=vertex needs about ")
    command = message.split("export again with: ")[1]
    assert command == f"python scripts/export.py run={run} export.resolution=128"  # the largest size that fits
    monkeypatch.undo()
    done = subprocess.run([sys.executable, *command.split()[1:]], cwd=ROOT, env=subprocess_env(), capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (run / "mesh.glb").is_file()


def test_the_memory_check_counts_only_what_the_export_adds_and_names_the_texture():
    from perpneg3d.export.mesh import BASE_BYTES, check_memory, estimate_peak_bytes

    need = estimate_peak_bytes(256, "vertex") - BASE_BYTES
    check_memory(256, "vertex", 1024, available=need)  # the process's own GiB is not free memory: it fits
    with pytest.raises(ExportError) as err:  # at 128^3 the 8192^2 texture is the cost: name texture_size
        check_memory(128, "uv", 8192, available=2 << 30)
    assert err.value.overrides == ("export.texture_size=4096",)
    assert str(err.value).endswith("GB is free: use export.texture_size=4096 (about 1.2 GB)")


# -- 5. safe overrides against the run's config --------------------------------------------------

def test_a_toy_only_safe_key_is_accepted_on_resume(tmp_path):
    run = train(compose_train(SHORT + [f"out_dir={tmp_path}"], tmp_path))
    proc = cli(f"resume={run}", "guidance.denoiser.chunk_size=256", "trainer.max_steps=7")
    assert proc.returncode == 0, proc.stderr[-2000:]
    saved = OmegaConf.load(run / "config.yaml")
    assert saved.guidance.denoiser.chunk_size == 256 and saved.trainer.max_steps == 7
    typo = cli(f"resume={run}", "guidance.denoiser.chunk_sise=256")
    assert typo.returncode == 2 and "unknown config key 'guidance.denoiser.chunk_sise'" in typo.stderr


def test_if_text_encoder_offload_is_safe_on_resume():
    from perpneg3d.training.resume_config import is_safe

    assert is_safe("guidance.denoiser.offload_text_encoder") and not is_safe("guidance.denoiser.pretrained_model_name_or_path")


# -- 6. config.yaml written atomically, one process per run folder ---------------------------------

def test_config_yaml_survives_a_kill_during_its_rewrite(tmp_path, monkeypatch):
    path = tmp_path / "config.yaml"
    write_atomic(path, "a: 1\nb: 2\n")

    def killed(*args):
        raise KeyboardInterrupt  # the moment between writing the new file and renaming it

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        write_atomic(path, "a: 1\n")
    assert path.read_text() == "a: 1\nb: 2\n"


def test_a_run_folder_in_use_is_refused(tmp_path):
    run = train(compose_train(SHORT, tmp_path))
    with RunLock() as holder:
        holder.acquire(run)
        with pytest.raises(OutputDirError) as err:
            train(compose_train(SHORT + [f"resume={run}", "trainer.max_steps=8"], tmp_path))
    assert str(err.value) == (f"run folder {run} is in use by another process (pid {os.getpid()}): wait for it to end "
                              "or stop it, then resume")
    train(compose_train(SHORT + [f"resume={run}", "trainer.max_steps=8"], tmp_path))  # released: resumes


# -- 9. Stable Diffusion's VAE sample comes from the run's stream --------------------------------------

def test_sd_posterior_sample_uses_the_runs_generator(tiny_sd):
    den = tiny_sd
    rgb = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    out = []
    for global_seed in (1, 2):
        torch.manual_seed(global_seed)  # the global stream must not matter
        out.append(den.encode_sample(rgb, torch.Generator().manual_seed(7)))
    assert torch.equal(out[0], out[1])
    assert not torch.equal(out[0], den.encode_sample(rgb, torch.Generator().manual_seed(8)))
    # and SDS draws it from the generator it is given (the run's device stream, saved in checkpoints)
    from perpneg3d.guidance.sds import ScoreDistillation
    from perpneg3d.prompts import PromptBatch

    sds = ScoreDistillation(den, guidance_scale=7.5, mode="cfg")
    prompts = PromptBatch(den.embed(["", "a corgi"]), torch.zeros(1, 0), torch.zeros(1, dtype=torch.long))
    losses = []
    for global_seed in (1, 2):
        torch.manual_seed(global_seed)
        losses.append(sds(rgb.permute(0, 2, 3, 1), prompts, 0, torch.Generator().manual_seed(7)).loss)
    assert torch.equal(losses[0], losses[1])


# -- 11. progress in log files -----------------------------------------------------------------------

def test_progress_prints_plain_lines_when_not_a_terminal(monkeypatch):
    clock = iter(range(0, 1000, 2))  # each step takes 2 s of a fake clock
    monkeypatch.setattr("perpneg3d.training.progress.time.perf_counter", lambda: next(clock))
    stream = io.StringIO()
    bar = Progress(0, 10, interval_s=5.0, stream=stream)
    for done in range(1, 11):
        bar.advance(done, loss=0.5 if done % 2 == 0 else None)
    lines = stream.getvalue().splitlines()
    # t0 = 0; steps end at 2, 4, ...; a line when >= 5 s passed since the last: steps 3, 6, 9, and the last
    assert [line.split(" |")[0] for line in lines] == ["train: step 3/10 (30%)", "train: step 6/10 (60%)",
                                                      "train: step 9/10 (90%)", "train: step 10/10 (100%)"]
    assert lines[-1] == "train: step 10/10 (100%) | 2000 ms/step | loss 0.5 | 0 s left"
    assert "\r" not in stream.getvalue()


def test_a_logged_run_has_no_progress_bar_redraws(tmp_path):
    proc = cli(*SHORT, "trainer.progress=true", f"out_dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "\r" not in proc.stderr and "train: step 6/6 (100%)" in proc.stderr
