"""Tests of pure parts: codecs, merge/split, fusion, schemas, packaging (no worker, no Redis
unless a fixture says so)."""
