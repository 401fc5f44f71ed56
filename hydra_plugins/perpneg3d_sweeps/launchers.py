"""hydra/launcher=submitit_slurm|submitit_local: hydra-submitit-launcher's launchers with one-line failures
per job and squeue when SLURM has no accounting (perpneg3d/sweeps.py has the behaviour)."""
from hydra_plugins.hydra_submitit_launcher import submitit_launcher

from perpneg3d.sweeps import OneLineJobs


class SlurmLauncher(OneLineJobs, submitit_launcher.SlurmLauncher):
    """hydra/launcher=submitit_slurm."""


class LocalLauncher(OneLineJobs, submitit_launcher.LocalLauncher):
    """hydra/launcher=submitit_local."""
