"""hetbatch: batch inference for heterogeneous models over Redis and Celery.

The one import name of the distribution. The repository keeps ``producers/`` (client
and the shared wire contract), ``worker/`` and ``adapters/`` at its root; packaging maps
them to ``hetbatch.producers``, ``hetbatch.worker`` and ``hetbatch.adapters``.

    from hetbatch import Client, AsyncClient
"""

from hetbatch.producers import (
    BrokerError,
    Client,
    ClientSettings,
    ConfigError,
    HetbatchError,
    Job,
    JobDeleted,
    JobError,
    JobExpired,
    JobFailed,
    JobLost,
    JobTimeout,
    ModelNotFound,
    ModelSpec,
    PayloadError,
    PayloadTooLarge,
    Registry,
    RemoteError,
    SchemaMismatch,
    Status,
    TensorSpec,
)
from hetbatch.producers.aio import AsyncClient, AsyncJob

__version__ = "0.2.0"

__all__ = [
    "AsyncClient",
    "AsyncJob",
    "BrokerError",
    "Client",
    "ClientSettings",
    "ConfigError",
    "HetbatchError",
    "Job",
    "JobDeleted",
    "JobError",
    "JobExpired",
    "JobFailed",
    "JobLost",
    "JobTimeout",
    "ModelNotFound",
    "ModelSpec",
    "PayloadError",
    "PayloadTooLarge",
    "Registry",
    "RemoteError",
    "SchemaMismatch",
    "Status",
    "TensorSpec",
    "__version__",
]
