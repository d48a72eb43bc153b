"""Tests of pure parts: codecs, merge/split, fusion, schemas, packaging. No worker, no Redis unless a fixture says so."""
