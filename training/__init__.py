"""Training of the models in `models/`: the configuration (config.py), the β-ELBO loop (loop.py), its data
(data.py) and its run plumbing (run.py: checkpoints, stop signals, the KL-spike guard, the weight average, DDP)."""
