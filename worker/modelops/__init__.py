"""Offline model work on the registry: model.toml, registration, conversion, ensembles, evaluation."""
