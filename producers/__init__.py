"""The hetbatch producer library: submit Arrow prediction jobs, read their results."""

from hetbatch.producers.client import Client, Job
from hetbatch.producers.errors import (
    BrokerError,
    ConfigError,
    HetbatchError,
    JobDeleted,
    JobError,
    JobExpired,
    JobFailed,
    JobLost,
    JobTimeout,
    ModelNotFound,
    PayloadError,
    PayloadTooLarge,
    RemoteError,
    SchemaMismatch,
)
from hetbatch.producers.protocol.registry import ModelSpec, Registry
from hetbatch.producers.protocol.schema import TensorSpec
from hetbatch.producers.protocol.wire import Status
from hetbatch.producers.settings import ClientSettings

__all__ = [
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
]
