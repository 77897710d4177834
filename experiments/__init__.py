"""Experiment modules: `python -m experiments.<name> [--quick] [--out DIR]`; `python -m experiments` runs all."""
