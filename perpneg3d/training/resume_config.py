"""Moved to perpneg3d/saved_config.py (a run's saved config is read below training/, by config.py too); this
name stays for code that imports it from here."""
from perpneg3d.saved_config import (ABSENT, SAFE_ON_RESUME, apply_changes, is_safe, leaves,  # noqa: F401
                                    load_saved_config, reconcile, requested_changes, requeued_config,
                                    resumed_config)
