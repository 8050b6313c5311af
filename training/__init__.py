"""Training of the models in `models/`: the configuration (config.py) and the β-ELBO loop (loop.py)."""
