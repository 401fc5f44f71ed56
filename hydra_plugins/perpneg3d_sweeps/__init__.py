"""perpneg3d's sweep launchers; Hydra loads launchers from the hydra_plugins namespace only."""
