"""Training: the loop, checkpoints, preemption handling and run wiring (the only part that sees all)."""
from perpneg3d.training.trainer import Trainer

__all__ = ["Trainer"]
