"""Benchmarks that print ratios against the in-process model call, measured in one run."""
