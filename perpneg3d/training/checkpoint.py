"""Moved to perpneg3d/checkpoint.py (a run folder's checkpoints are read below training/, by config.py too);
this name stays for code that imports it from here."""
from perpneg3d.checkpoint import (CKPT_FORMAT, CKPT_NAME, REQUIRED_KEYS, checkpoint_path,  # noqa: F401
                                  latest_valid_checkpoint, list_checkpoints, load_checkpoint, prune_checkpoints,
                                  resolve_resume, run_dir_of, save_checkpoint, set_aside_later)
