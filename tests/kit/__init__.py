"""Shared test kit: tiny real models built on data the libraries ship, worker processes, fault injectors. Imported by tests, bench and scripts."""
