"""End-to-end tests: a real Redis and real worker processes."""
