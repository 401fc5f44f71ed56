"""Hydra glue: one-line errors for bad overrides and bad constructor keys, and the script entry point."""
from __future__ import annotations

import argparse
import inspect
import os
import re
import sys
import warnings
from pathlib import Path
from typing import Callable

from perpneg3d.errors import ConfigError, PerpNegError, reported_errors

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"


def sweep_variants(overrides: list[str]) -> list[list[str]]:
    """Command lines that together use every value of every sweep (a=1,2 / range / choice) once: the
    first values of all, then each further value of one sweep with the others at their first. Composing
    these finds a bad value before any job is launched, in len(values) compositions, not their product."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides)
    values = [list(p.sweep_string_iterator()) if p.is_sweep_override() else None for p in parsed]
    firsts = [text if v is None else f"{p.get_key_element()}={v[0]}" for text, p, v in zip(overrides, parsed, values)]
    variants = [firsts]
    for i, (p, v) in enumerate(zip(parsed, values)):
        for value in (v or [])[1:]:
            variants.append(firsts[:i] + [f"{p.get_key_element()}={value}"] + firsts[i + 1:])
    return variants


def explain_compose_error(err: Exception) -> str:
    """One line from Hydra's multi-line composition errors."""
    from hydra.errors import MissingConfigException

    if isinstance(err, MissingConfigException) and err.missing_cfg_file:
        group, _, option = str(err.missing_cfg_file).rpartition("/")
        options = ", ".join(err.options or [])
        if options:
            return f"unknown {group} '{option}': choose one of {options}"
    text = str(err)
    key = re.search(r"Could not override '([^']+)'", text)
    if key:
        return (f"unknown config key '{key.group(1)}': check its spelling (--cfg job prints every key) "
                f"or add a new key with +{key.group(1)}=...")
    missing = re.search(r"Could not (?:find|load) '([^']+)'", text)
    if missing:
        return f"unknown config '{missing.group(1)}': check the group and option names in configs/"
    return text.strip().splitlines()[0]


def parse_command_line(argv: list[str]):
    """Hydra's own reading of a command line (its argparse parser): flags such as `--cfg job` or
    `-cn train` with their values, and the overrides. None when Hydra itself will refuse the line
    (it then prints its own usage error)."""
    from hydra._internal.utils import get_args_parser

    parser = get_args_parser()
    parser.exit_on_error = False
    try:
        args, unknown = parser.parse_known_args(argv)
    except (argparse.ArgumentError, SystemExit):
        return None
    return None if unknown else args


def check_overrides(config_name: str, argv: list[str]) -> list[str]:
    """Compose the config with the command line (Hydra flags and their values are read as Hydra reads
    them; every sweep value once); raise ConfigError with one line if it fails. Returns argv with its
    overrides as resume_overrides rewrites them, flags left where they were."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    args = parse_command_line(argv)
    if args is None or args.config_path or args.config_dir:
        return argv  # Hydra reports a malformed line itself; another config folder is the user's to compose
    try:
        rewritten = refine_overrides(resume_overrides(args.overrides))
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            for overrides in sweep_variants(rewritten):
                compose(args.config_name or config_name, overrides=overrides, return_hydra_config=True)
    except PerpNegError:
        raise
    except Exception as err:  # Hydra raises several unrelated classes for user typos
        raise ConfigError(explain_compose_error(err)) from None
    finally:
        GlobalHydra.instance().clear()
    replace = dict(zip(args.overrides, rewritten))
    return [replace.get(a, a) for a in argv] + rewritten[len(args.overrides):]


def refine_overrides(overrides: list[str]) -> list[str]:
    """With refine=<run> (and no resume=), `stage=<the source run's refine_stage>` is added unless the line
    names a stage, so that the stage's keys (geometry.grid_resolution, ...) can be overridden."""
    refine = [o.split("=", 1)[1] for o in overrides if o.startswith("refine=") and o.split("=", 1)[1] not in ("", "null")]
    if not refine or any(o.startswith("stage=") for o in overrides) or \
            any(o.startswith("resume=") and o.split("=", 1)[1] not in ("", "null") for o in overrides):
        return list(overrides)
    from perpneg3d.saved_config import stage_of

    return list(overrides) + [f"stage={stage_of(refine[-1], overrides)}"]


def resume_overrides(overrides: list[str]) -> list[str]:
    """With resume=<run>, a plain `key=value` whose key the run's own config.yaml has becomes
    `++key=value`, so that Hydra accepts keys the default config lacks (a toy run's
    guidance.denoiser.chunk_size); resume_config then checks it against the run's values. Other
    lines are returned unchanged (a typo stays an unknown key)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf

    from perpneg3d.checkpoint import run_dir_of

    parsed = OverridesParser.create().parse_overrides(overrides)
    resume = [p.value() for p in parsed if p.key_or_group == "resume" and p.value()]
    saved_path = run_dir_of(str(resume[-1])) / "config.yaml" if resume else None
    if saved_path is None or not saved_path.is_file():
        return list(overrides)
    saved = OmegaConf.load(saved_path)
    out = []
    for text, p in zip(overrides, parsed):
        plain = not (p.is_add() or p.is_delete() or p.is_force_add() or p.is_sweep_override()) and "=" in text
        if plain and "/" not in p.key_or_group and p.key_or_group != "resume" and \
                OmegaConf.select(saved, p.key_or_group, default=_MISSING) is not _MISSING:
            text = "++" + text
        out.append(text)
    return out


_MISSING = object()


def compose_config(config_name: str, overrides: list[str]):
    """Compose configs/<config_name>.yaml with overrides, inside a running Hydra app or outside one."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    if GlobalHydra.instance().is_initialized():
        return compose(config_name, overrides=list(overrides))
    try:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            return compose(config_name, overrides=list(overrides))
    finally:
        GlobalHydra.instance().clear()


def instantiate(node, *args, **kwargs):
    """hydra.utils.instantiate, with a user's mistake reported as one ConfigError line.

    Unknown keyword -> names the key, the class and its valid keys; a PerpNegError raised inside a
    constructor is passed through unwrapped.
    """
    from hydra.errors import InstantiationException
    from hydra.utils import get_class, instantiate as hydra_instantiate

    try:
        return hydra_instantiate(node, *args, **kwargs)
    except InstantiationException as err:
        cause = err.__cause__
        while isinstance(cause, InstantiationException) and cause.__cause__ is not None:
            cause = cause.__cause__
        if isinstance(cause, PerpNegError):
            raise cause from None
        bad = re.search(r"unexpected keyword argument '([^']+)'", str(err))
        target = re.search(r"Error in call to target '([^']+)'", str(err))
        if bad and target:
            params = inspect.signature(get_class(target.group(1)).__init__).parameters
            valid = ", ".join(p for p in params if p != "self")
            where = re.search(r"full_key: (\S+)", str(err))
            key = f"{where.group(1)}.{bad.group(1)}" if where else bad.group(1)
            raise ConfigError(f"config key {key} is not an argument of {target.group(1)}: "
                              f"remove it or use one of {valid}") from None
        raise ConfigError(str(err).strip().splitlines()[0]) from None


def quiet_schema_warning() -> None:
    """configs/hydra/launcher/submitit_slurm.yaml shares its name with the plugin's schema, which Hydra
    1.3 validates it against (as intended) while warning that this matching is deprecated."""
    warnings.filterwarnings("ignore", message=r"(?s).*is validated against ConfigStore schema")


def run_script(config_name: str, fn: Callable) -> None:
    """Entry point of every script: pre-check overrides (one-line errors), then run under Hydra."""
    import hydra

    quiet_schema_warning()
    with reported_errors():
        sys.argv[1:] = check_overrides(config_name, sys.argv[1:])
    args = parse_command_line(sys.argv[1:])
    if args is not None and args.multirun:  # jobs that run at once share the cores (threads.py)
        from perpneg3d.threads import SWEEP_JOBS_ENV, count_sweep_jobs

        os.environ[SWEEP_JOBS_ENV] = str(count_sweep_jobs(args.overrides))

    @hydra.main(config_path=str(CONFIG_DIR), config_name=config_name, version_base="1.3")
    def _main(cfg):
        if in_submitit_job():  # perpneg3d.sweeps reports the error in one line and lets the other jobs run
            return fn(cfg)
        with reported_errors():
            return fn(cfg)

    with reported_errors():  # Ctrl-C while Hydra itself starts or launches jobs
        _main()


def in_submitit_job() -> bool:
    """Whether this is a job that one of perpneg3d.sweeps' launchers started."""
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.initialized() and str(HydraConfig.get().launcher.get("_target_", "")).startswith("hydra_plugins.perpneg3d_sweeps.")
