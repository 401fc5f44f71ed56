"""Every option is checked when its component is built: one line naming the key, the value and the rule."""
import pytest
from omegaconf import DictConfig, ListConfig, OmegaConf

from helpers import TINY_TOY, compose_train
from perpneg3d.config import instantiate
from perpneg3d.errors import ConfigError, PerpNegError
from perpneg3d.training.run import train

# At least one rejected value per option group, with the exact line a user sees.
CATALOGUE = [
    ("trainer.max_steps=1.5", "trainer.max_steps=1.5: must be a valid integer, got a number with a fractional part"),
    ("trainer.max_steps=0", "trainer.max_steps=0: must be greater than or equal to 1"),
    ("trainer.lambda_orient=[5000,1,2,0]", "trainer.lambda_orient=[5000, 1, 2, 0]: the ramp's steps must satisfy "
                                           "0 <= start_step <= end_step"),
    ("trainer.betas=[0.9]", "trainer.betas=[0.9]: wrong number of values"),
    ("trainer.nonfinite_skip_share=2", "trainer.nonfinite_skip_share=2: must be less than or equal to 1"),
    ("cameras.fovy_range=[70,40]", "cameras.fovy_range=[70, 40]: the first value must not exceed the second "
                                   "(use [40.0, 70.0])"),
    ("cameras.elevation_range=[0,120]", "cameras.elevation_range[1]=120: must be less than or equal to 90"),
    ("cameras.batch_size=0", "cameras.batch_size=0: must be greater than or equal to 1"),
    ("cameras.heights=[0]", "cameras.heights[0]=0: must be greater than or equal to 1"),
    ("cameras.resolution_milestones=[10]", "cameras: 1 heights need 0 resolution_milestones, got [10]"),
    ("geometry.n_levels=0", "geometry.n_levels=0: must be greater than or equal to 1"),
    ("geometry.radius=-1", "geometry.radius=-1: must be greater than 0"),
    ("geometry.log2_hashmap_size=40", "geometry.log2_hashmap_size=40: must be less than or equal to 30"),
    ("renderer.num_samples_per_ray=0", "renderer.num_samples_per_ray=0: must be greater than or equal to 1"),
    ("renderer.occ_threshold=-0.1", "renderer.occ_threshold=-0.1: must be greater than or equal to 0"),
    ("renderer.material.albedo_ratio=1.5", "renderer.material.albedo_ratio=1.5: must be less than or equal to 1"),
    ("renderer.background.color=[1,1]", "renderer.background.color=[1, 1]: wrong number of values"),
    ("prompts.front_max_deg=0", "prompts.front_max_deg=0: must be greater than 0"),
    ("prompts.schedule.front_side=[1,2]", "prompts.schedule.front_side=[1, 2]: wrong number of values"),
    ("guidance.guidance_scale=-1", "guidance.guidance_scale=-1: must be greater than 0"),
    ("guidance.min_step_percent=[0,0.5,0.1]", "guidance.min_step_percent=[0, 0.5, 0.1]: use a number or "
                                              "[start_step, start_value, end_value, end_step]"),
    ("guidance.neg_gain=-1", "guidance.neg_gain=-1: must be greater than or equal to 0"),
    ("guidance.denoiser.tau=0", "guidance.denoiser.tau=0: must be greater than 0"),
    ("guidance.denoiser.dataset.view_caption_prob=1.2", "guidance.denoiser.dataset.view_caption_prob=1.2: must be "
                                                        "less than or equal to 1"),
    ("guidance.denoiser.text_encoder.dim=0", "guidance.denoiser.text_encoder.dim=0: must be greater than or equal to 1"),
    ("export.resolution=4", "export.resolution=4: must be greater than or equal to 8"),
    ("export.min_component_ratio=2", "export.min_component_ratio=2: must be less than or equal to 1"),
    # issue 19: options that were accepted and did nothing or harm
    ("guidance.grad_clip=-1", "guidance.grad_clip=-1: must be positive (every value of a ramp)"),
    ("guidance.grad_clip=[0,1,-2,100]", "guidance.grad_clip=[0, 1, -2, 100]: must be positive (every value of a ramp)"),
    ("trainer.betas=[1.0,0.99]", "trainer.betas[0]=1.0: must be less than 1"),
    ("guidance.min_step_percent=[0,0.1,0.9,100] guidance.max_step_percent=[0,0.5,0.95,2000]",
     "guidance.min_step_percent=[0, 0.1, 0.9, 100] and max_step_percent=[0, 0.5, 0.95, 2000] cross at step 100 "
     "(min 0.9 > max 0.522): choose ramps with min <= max at every step"),
    ("guidance.min_step_percent=0.9 guidance.max_step_percent=0.5",
     "guidance.min_step_percent=0.9 and max_step_percent=0.5 cross at step 0 (min 0.9 > max 0.5): choose ramps with "
     "min <= max at every step"),
    ("guidance.max_step_percent=1.5", "guidance.min_step_percent=[0, 0.6, 0.02, 600] and max_step_percent=1.5 leave "
                                      "[0, 1] at step 0 (min 0.6, max 1.5): use fractions of the training timesteps"),
    ("guidance.mode=cfg", "guidance.neg_gain=2.0 has no effect with guidance.mode=cfg: it weights the negatives, which "
                          "only perpneg and cebm subtract; remove it or use mode=perpneg"),
    ("guidance.mode=negprompt guidance.neg_gain=1 guidance.neg_alignment=true",
     "guidance.neg_alignment=True has no effect with guidance.mode=negprompt: it weights the negatives, which only "
     "perpneg and cebm subtract; remove it or use mode=perpneg"),
    ("guidance.mode=cfg guidance.neg_gain=1 guidance.neg_time_ramp=[0.2,0.6]",
     "guidance.neg_time_ramp=[0.2, 0.6] has no effect with guidance.mode=cfg: it weights the negatives, which only "
     "perpneg and cebm subtract; remove it or use mode=perpneg"),
    ("guidance.mode=perp", "guidance.mode='perp' is unknown: use one of cfg, negprompt, cebm, perpneg"),
    ("guidance.weighting=snr", "guidance.weighting='snr' is unknown: use sds or uniform"),
    ("guidance.neg_time_ramp=[0.6,0.2]", "guidance.neg_time_ramp=[0.6, 0.2]: the first value must not exceed the "
                                         "second (use [0.2, 0.6])"),
    ("trainer.eps=0", "trainer.eps=0: must be greater than 0"),
    ("trainer.keep_checkpoints=0", "trainer.keep_checkpoints=0: must be greater than or equal to 1"),
    ("trainer.turntable_elevation=100", "trainer.turntable_elevation=100: must be less than or equal to 90"),
    ("renderer.chunk_rays=0", "renderer.chunk_rays=0: must be greater than or equal to 1"),
    ("cameras.distance_range=[0,1]", "cameras.distance_range[0]=0: must be greater than 0"),
    ("prompts.overhead_min_deg=100", "prompts.overhead_min_deg=100: must be less than or equal to 90"),
    ("seed=0.5", "seed=0.5 must be an integer"),
    ("threads=0", "threads=0: use auto or a positive integer"),
]


@pytest.mark.parametrize("override, message", CATALOGUE)
def test_bad_values_are_one_line(override, message, tmp_path):
    with pytest.raises(PerpNegError) as err:
        train(compose_train(TINY_TOY + override.split(" "), tmp_path))
    assert str(err.value) == message


# Values that look like mistakes but are valid, built as the component (success is the assertion).
ACCEPTED = [
    ("guidance", "guidance.min_step_percent=0.5 guidance.max_step_percent=0.5"),  # one fixed t, as threestudio allows
    ("guidance", "guidance.min_step_percent=[0,0.1,0.5,100] guidance.max_step_percent=[0,0.5,0.5,2000]"),  # touch, not cross
    ("guidance", "guidance.mode=cfg guidance.neg_gain=1"),
    ("guidance", "guidance.grad_clip=[0,2,8,1000]"),
    ("trainer", "trainer.betas=[0.0,0.999]"),
]


@pytest.mark.parametrize("group, overrides", ACCEPTED)
def test_valid_edge_values_are_accepted(group, overrides, tmp_path):
    cfg = compose_train(TINY_TOY + overrides.split(" "), tmp_path)
    instantiate(cfg[group])


def targets(node, path=""):
    if isinstance(node, DictConfig):
        if "_target_" in node:
            yield path, node
        for key in node:
            yield from targets(node[key], f"{path}.{key}" if path else str(key))


def is_number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool)


@pytest.fixture(scope="module")
def component_configs(tmp_path_factory):
    cfg = compose_train(TINY_TOY, tmp_path_factory.mktemp("cfg"))
    OmegaConf.resolve(cfg)
    return cfg


def test_the_catalogue_covers_every_option_group(component_configs):
    groups = {path for path, _ in targets(component_configs)}
    covered = {o.split("=")[0].rsplit(".", 1)[0] for o, _ in CATALOGUE}
    assert groups == {"trainer", "cameras", "geometry", "renderer", "renderer.material", "renderer.background",
                      "prompts", "prompts.schedule", "guidance", "guidance.denoiser", "guidance.denoiser.dataset",
                      "guidance.denoiser.text_encoder", "export"}
    assert groups <= covered, sorted(groups - covered)


def test_every_numeric_option_rejects_a_non_number(component_configs):
    """For each component and each of its numeric options (or lists of numbers): a string is refused
    by the constructor itself, in one line naming the key."""
    checked = 0
    for path, node in targets(component_configs):
        parts = {k: instantiate(node[k]) for k in node if isinstance(node[k], DictConfig) and "_target_" in node[k]}
        for key in node:
            value = node[key]
            numeric = is_number(value) or (isinstance(value, ListConfig) and len(value) and all(map(is_number, value)))
            if not numeric:
                continue
            bad = OmegaConf.create({k: v for k, v in OmegaConf.to_container(node).items() if k not in parts})
            bad[key] = "abc" if is_number(value) else ["abc"] * len(value)
            with pytest.raises(ConfigError) as err:
                instantiate(bad, **parts)
            assert str(err.value).startswith(f"{path}.{key}") and "\n" not in str(err.value), str(err.value)
            checked += 1
    assert checked >= 70
