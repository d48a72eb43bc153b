"""The exception tree, as ``hetbatch.errors`` (defined in ``hetbatch.producers.errors``)."""

from hetbatch.producers.errors import *  # noqa: F403
from hetbatch.producers.errors import __all__ as __all__
