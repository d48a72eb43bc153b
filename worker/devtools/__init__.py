"""Developer tooling, not used by a running worker: the demo and a private redis-server."""
