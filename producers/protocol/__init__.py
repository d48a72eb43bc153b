"""The contract both sides share: the client publishes with it, the worker reads with it.

Envelope and codecs (``wire``, ``ipc``), Redis key names (``keys``), the Celery/kombu
message and queue layout (``kombu``), payload transport (``transport``, ``shm``), the
ledger of published tasks, the model registry, tensor schemas, ensemble specs and
retention (delete, purge). Nothing here imports the client or the worker.
"""
