"""Shared test kit: tiny real models built on data the libraries ship, worker processes and
fault injectors; imported by tests, bench and scripts."""
