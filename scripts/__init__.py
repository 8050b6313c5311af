"""Checkout tools (data preparation, evaluation, benchmarks, plots, the demo), run from the repository root
as `python -m scripts.NAME`; not part of the installed package."""
