"""Hyperparameter sweeps of SANE pretraining with Ray Tune (docs/tune.md)."""
