"""Dataset runs: score a folder, a glob or a list of Parquet files through the queue.

``hetbatch run`` is the command; ``run_dataset`` is the library call behind it::

    from hetbatch.producers import Client
    from hetbatch.producers.dataset import RunOptions, run_dataset

    with Client.from_url("redis://localhost:6379/0") as client:
        summary = run_dataset(RunOptions("churn", ("s3://lake/events/",), "s3://lake/scores/"), client)

The output mirrors the input's files (hive folders included), each part committed
atomically and recorded in ``_hetbatch_manifest.json``; the same call again resumes
an interrupted run; rows the model cannot take stop the run with their file, row and
column, or go to a rejects folder with their reason (``on_error="quarantine"``).
"""

from hetbatch.producers.dataset.manifest import Manifest, ManifestConflict
from hetbatch.producers.dataset.progress import RunSummary
from hetbatch.producers.dataset.run import MANIFEST_NAME, SUCCESS_NAME, RowRejected, RunOptions, run_dataset
from hetbatch.producers.dataset.screen import ERROR_COLUMNS, screen

__all__ = [
    "ERROR_COLUMNS",
    "MANIFEST_NAME",
    "SUCCESS_NAME",
    "Manifest",
    "ManifestConflict",
    "RowRejected",
    "RunOptions",
    "RunSummary",
    "run_dataset",
    "screen",
]
