"""The hetbatch producer library: submit Arrow prediction jobs, read their results."""

from producers.client import Client, Job
from producers.errors import (
    BrokerError,
    ConfigError,
    HetbatchError,
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
from producers.registry import ModelSpec, Registry
from producers.schema import TensorSpec
from producers.settings import ClientSettings
from producers.wire import Status

__all__ = [
    "BrokerError",
    "Client",
    "ClientSettings",
    "ConfigError",
    "HetbatchError",
    "Job",
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
