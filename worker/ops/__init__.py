"""Operator tools over a running deployment: status, reconciler, dead letters, Flower."""
