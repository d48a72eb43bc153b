"""Operator scripts run from the repository root: ``python -m scripts.chaos``, ``python -m scripts.gpu_check``."""
