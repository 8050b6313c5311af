"""Training of the models in `models/`: the configuration (config.py), starting a run (start.py), the β-ELBO
loop (loop.py, the `rec-codec-train` command), what it optimises and measures (objective.py), its data (data.py)
and its run plumbing (run.py: the run's state, checkpoints, stop signals, the KL-spike guard, the weight
average, DDP agreement)."""
