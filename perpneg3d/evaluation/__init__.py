"""Evaluation: 2D view fidelity (the paper's Table 1) and 3D Janus metrics (Table 2)."""
