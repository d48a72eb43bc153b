"""Imported by Python at start in a process with this folder on PYTHONPATH (tests.kit.spans)."""

from tests.kit.spans import install

install()
