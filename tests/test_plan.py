"""The run plan (issue 32): each kind of start, decided once from the command line's config and the disk."""
import pytest

from helpers import TINY_TOY, compose_train
from perpneg3d.config import check_overrides
from perpneg3d.errors import ConfigError
from perpneg3d.run_dir import RunLock
from perpneg3d.training.plan import plan_run
from perpneg3d.training.run import train

BASE = TINY_TOY + ["trainer.max_steps=3", "trainer.ckpt_every=3", "threads=1"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return train(compose_train(BASE, tmp_path_factory.mktemp("plan")), BASE)


def plan_of(overrides, out, into=None):
    with RunLock() as lock:
        return plan_run(compose_train(overrides, out), overrides, lock, into)


def test_a_fresh_start_claims_a_new_folder_and_trains_from_nothing(tmp_path):
    plan = plan_of(BASE, tmp_path)
    assert (plan.kind, plan.stage, plan.state, plan.checkpoint, plan.source) == ("fresh", "first", None, None, None)
    assert plan.run_dir.parent == tmp_path / "toy" and plan.run_dir.is_dir() and plan.trains
    assert plan.then_refine is None and not plan.initialises


def test_a_resume_continues_the_run_s_own_config_from_its_checkpoint(run, tmp_path):
    plan = plan_of([f"resume={run}", "trainer.max_steps=5"], tmp_path)
    assert (plan.kind, plan.run_dir, plan.checkpoint) == ("resume", run, run / "ckpts" / "step_0000003.ckpt")
    assert plan.state["step"] == 3 and plan.cfg.trainer.max_steps == 5 and plan.cfg.seed == 0
    assert not plan.initialises


def test_a_job_folder_with_a_checkpoint_is_a_requeue_and_a_finished_first_stage_goes_on_to_refine(run, tmp_path):
    plan = plan_of(BASE, tmp_path, into=run)
    assert (plan.kind, plan.state["step"], plan.trains, plan.then_refine) == ("requeue", 3, True, None)
    both = BASE + ["then_refine=true", 'refine_overrides=["trainer.max_steps=2"]']
    plan = plan_of(both, tmp_path, into=run)
    assert (plan.kind, plan.trains, plan.then_refine) == ("requeue", False, ["trainer.max_steps=2"])


def test_an_empty_job_folder_is_a_fresh_start_there(tmp_path):
    plan = plan_of(BASE, tmp_path, into=tmp_path / "job")
    assert (plan.kind, plan.run_dir, plan.state) == ("fresh", tmp_path / "job", None)


def test_a_refine_start_builds_the_stage_s_config_from_its_source(run, tmp_path):
    overrides = check_overrides("train", [f"refine={run}", "geometry.grid_resolution=16"])
    plan = plan_of(overrides, tmp_path)
    assert (plan.kind, plan.stage, plan.source, plan.state) == ("fresh", "refine", run.resolve(), None)
    assert plan.initialises and plan.run_dir.parent.name == "toy_refine"
    assert plan.cfg.geometry.grid_resolution == 16 and plan.cfg.prompt == "a toy dog"


def test_a_refusal_happens_before_any_folder_is_claimed(tmp_path):
    with pytest.raises(ConfigError, match=r"^seed='x' must be an integer$"):
        plan_of(BASE + ["seed=x"], tmp_path)
    assert not (tmp_path / "toy").exists()
