"""A run's saved config.yaml, read: what a resumed run is, and which run a refine run starts from.

What a resumed run is: its own config.yaml, plus the few changes that keep it the same run.

A run's identity is everything that shapes what it learns: the prompt, the prior and its guidance,
the prompts and their weights, the geometry, renderer and cameras, the optimiser, the seed. Resuming
with any of those changed would train a hybrid that no config describes, so it is refused; only the
keys in SAFE_ON_RESUME (how long, how often to log or save, how to export, which device) may change.
docs/resume.md has the table. This module sits below training/ (config.py reads a refine run's stage
here before Hydra composes the command line); training/plan.py decides with it.
"""
from __future__ import annotations

import fnmatch
import logging
from pathlib import Path
from typing import Any, Callable

from omegaconf import DictConfig, OmegaConf

from perpneg3d.checkpoint import latest_valid_checkpoint, run_dir_of
from perpneg3d.errors import ConfigError

log = logging.getLogger(__name__)

# Keys a resumed run (or a requeued sweep job) may change; fnmatch patterns on dotted keys.
SAFE_ON_RESUME = (
    "resume", "out_dir", "name", "then_refine", "refine_overrides", "refine_stage",
    "trainer.max_steps", "trainer.val_every", "trainer.val_resolution", "trainer.ckpt_every",
    "trainer.keep_checkpoints", "trainer.log_every", "trainer.turntable_*", "trainer.progress",
    "trainer.max_nonfinite_steps", "threads",
    "evaluate_janus", "export", "export.*",
    "guidance.denoiser.device", "guidance.denoiser.local_files_only", "guidance.denoiser.enable_attention_slicing",
    "guidance.denoiser.channels_last", "guidance.denoiser.compile", "guidance.denoiser.cudnn_benchmark",
    "guidance.denoiser.chunk_size", "guidance.denoiser.dataset.cache_dir", "guidance.denoiser.offload_text_encoder",
    "renderer.chunk_rays",
)
ABSENT = "<absent>"


def is_safe(key: str) -> bool:
    return any(fnmatch.fnmatchcase(key, pattern) for pattern in SAFE_ON_RESUME)


def leaves(cfg) -> dict[str, Any]:
    """Dotted key -> value for every leaf of a config (lists are leaves), resolved."""
    container = OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else cfg
    out: dict[str, Any] = {}

    def walk(node, prefix):
        if isinstance(node, dict) and node:
            for k, v in node.items():
                walk(v, f"{prefix}.{k}" if prefix else str(k))
        else:
            out[prefix] = node

    walk(container, "")
    out.pop("hydra", None)
    return {k: v for k, v in out.items() if not k.startswith("hydra.")}


def requested_changes(overrides: list[str], compose: Callable[[list[str]], DictConfig]) -> dict[str, Any]:
    """The leaves the command line sets: those where compose(overrides) differs from the defaults,
    and every leaf under a key or config group the overrides name (a value set equal to its default
    is still a request)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = [(text, p) for text, p in zip(overrides, OverridesParser.create().parse_overrides(overrides))
              if not p.is_hydra_override() and p.key_or_group != "resume"]
    base, new = leaves(compose([])), leaves(compose([text for text, _ in parsed]))
    keys = {k for k in new.keys() | base.keys() if new.get(k, ABSENT) != base.get(k, ABSENT)}
    for _, p in parsed:
        named = p.key_or_group.replace("/", ".")
        if named == "experiment":
            continue  # a global preset: its leaves are those that differ from the defaults (above)
        keys |= {k for k in new.keys() | base.keys() if k == named or k.startswith(named + ".")}
    return {k: new.get(k, ABSENT) for k in keys}


def reconcile(saved: DictConfig, wanted: dict[str, Any], where: str, fix: str, explicit: bool = True) -> DictConfig:
    """saved + the wanted values that differ from it, if every one of them is safe; else ConfigError.
    explicit=False (a whole composed config, not the user's overrides): a key the saved config lacks
    is an option newer than the run and takes its default."""
    old = leaves(saved)
    changed = {k: v for k, v in wanted.items() if v != old.get(k, ABSENT)}
    if not explicit:
        changed = {k: v for k, v in changed.items() if k in old or is_safe(k)}
    identity = sorted(k for k in changed if not is_safe(k))
    if identity:
        k = identity[0]
        more = f" (and {len(identity) - 1} more: {', '.join(identity[1:4])})" if len(identity) > 1 else ""
        raise ConfigError(f"{where}: {k}={changed[k]!r} would change the run, which has {k}={old.get(k, ABSENT)!r}"
                          f"{more}; {fix}")
    return apply_changes(saved, changed, where)


def apply_changes(saved: DictConfig, changed: dict[str, Any], where: str) -> DictConfig:
    """A resolved copy of `saved` with each dotted key set to its value (ABSENT: removed), logged."""
    old = leaves(saved)
    cfg = OmegaConf.create(OmegaConf.to_container(saved, resolve=True))
    for k, v in sorted(changed.items()):
        if v == ABSENT:  # removed with ~key: drop the leaf, then parents it leaves empty
            while k:
                parent, _, last = k.rpartition(".")
                node = OmegaConf.select(cfg, parent) if parent else cfg
                if node is None or last not in node or (OmegaConf.is_dict(node[last]) and len(node[last])):
                    break
                del node[last]
                k = parent
        else:
            OmegaConf.update(cfg, k, v, merge=False, force_add=True)
        log.info("%s: %s=%r (was %r)", where, k, v, old.get(k, ABSENT))
    return cfg


def load_saved_config(run_dir: Path) -> DictConfig:
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise ConfigError(f"{run_dir} has no config.yaml, so its run cannot be rebuilt: resume a folder written by train.py")
    return OmegaConf.load(path)


def source_folder(refine: str) -> Path:
    """The run folder refine= names (a folder or one of its checkpoints), checked to have a config and a checkpoint."""
    source = run_dir_of(str(refine))
    if not (source / "config.yaml").is_file():
        raise ConfigError(f"refine={refine}: no config.yaml in {source}: pass a run folder written by train.py")
    if Path(refine).expanduser().is_dir() and latest_valid_checkpoint(source) is None:
        raise ConfigError(f"refine={refine}: no readable checkpoint in {source / 'ckpts'}: refine a run that has trained")
    earlier = load_saved_config(source).get("refine")
    if earlier:
        raise ConfigError(f"refine={refine} is itself a refine run (of {earlier}): refine that run, or resume this one "
                          f"with resume={refine} trainer.max_steps=<more>")
    return source


def stage_of(refine: str, overrides: list[str]) -> str:
    """The stage config: stage=<name> from the command line, else the source run's refine_stage."""
    given = [o.split("=", 1)[1] for o in overrides if o.startswith("stage=")]
    if given:
        return given[-1]
    return str(load_saved_config(source_folder(refine)).get("refine_stage", "refine"))


def resumed_config(cfg: DictConfig, run_dir: Path, overrides: list[str] | None,
                   compose: Callable[[list[str]], DictConfig] | None = None) -> DictConfig:
    """The config of `python train.py resume=<run_dir> <overrides>`: the run's own config.yaml with
    the safe overrides on top. overrides=None (a config built in Python): every key of `cfg` that
    differs from the saved one counts as requested."""
    saved = load_saved_config(run_dir)
    wanted = leaves(cfg) if overrides is None else requested_changes(overrides, compose)
    resumed = reconcile(saved, wanted, f"resume={cfg.resume}",
                        "start a new run (without resume=) to change it; resume may change only how long the run "
                        "trains, how it logs, saves and exports, and the device (docs/resume.md)",
                        explicit=overrides is not None)
    resumed.resume = cfg.resume
    return resumed


def requeued_config(cfg: DictConfig, job_dir: Path) -> DictConfig:
    """A requeued sweep job: its own config.yaml, refusing a composed config that now differs in identity."""
    return reconcile(load_saved_config(job_dir), leaves(cfg), f"requeued job {job_dir}",
                     "the configs changed since the job started: restore them, or start a new sweep", explicit=False)
