"""The hetbatch worker: Celery app, queues and routing, batching, model cache."""

from hetbatch.worker.settings import WorkerSettings

__all__ = ["WorkerSettings"]
