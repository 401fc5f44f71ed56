"""perpneg3d training entry point (Hydra).

    python train.py prompt="a corgi standing"                 # Stable Diffusion 2.1-base on CUDA
    python train.py experiment=toy                            # offline toy prior, any CPU, minutes
    python train.py resume=outputs/toy/2026-11-24_08-00-00     # continue a run from its newest checkpoint
    python train.py -m 'prompt="a corgi standing","a westie"' seed=0,1,2 hydra/launcher=submitit_slurm
"""
from perpneg3d.errors import quiet_ctrl_c

quiet_ctrl_c()  # before torch is imported: Ctrl-C during start-up prints one line, not a traceback
from perpneg3d.config import run_script  # noqa: E402
from perpneg3d.training.run import train  # noqa: E402

if __name__ == "__main__":
    run_script("train", train)
