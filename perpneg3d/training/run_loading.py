"""Re-open a finished (or interrupted) run: its resolved config and the field at its newest checkpoint."""
from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

from perpneg3d.config import instantiate
from perpneg3d.errors import CheckpointError, ConfigError
from perpneg3d.checkpoint import resolve_resume


def load_run(run: str | Path, device: str = "cpu"):
    """(cfg, geometry, renderer, cameras, step, run_dir) of a run folder or checkpoint file, in eval mode."""
    run_dir, _, state = resolve_resume(str(run))
    config = run_dir / "config.yaml"
    if not config.is_file():
        raise ConfigError(f"{run_dir} has no config.yaml: pass a folder written by train.py")
    cfg = OmegaConf.load(config)
    geometry = instantiate(cfg.geometry)
    renderer = instantiate(cfg.renderer)
    try:
        geometry.load_state_dict(state["geometry"])
        renderer.load_state_dict(state["renderer"])
    except RuntimeError as err:
        raise CheckpointError(f"checkpoint of {run_dir} does not match its config.yaml ({str(err).splitlines()[0]})") from None
    geometry.to(device).eval()
    renderer.to(device).eval()
    return cfg, geometry, renderer, instantiate(cfg.cameras), int(state["step"]), run_dir


def view_classifier_from_config(cfg, prompt: str, clip_model: str):
    """classifier_for() of a run's prior, without loading the prior when it has no classifier of its
    own (Stable Diffusion is never loaded just to be told to use CLIP)."""
    from hydra.utils import get_class

    from perpneg3d.contracts import HasViewClassifier
    from perpneg3d.evaluation.classifiers import classifier_for

    has_own = issubclass(get_class(cfg.guidance.denoiser._target_), HasViewClassifier)
    return classifier_for(instantiate(cfg.guidance.denoiser) if has_own else None, prompt, clip_model)
