"""Worker settings: the only place the worker side reads environment variables."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from hetbatch.producers.protocol.keys import DEFAULT_PREFIX
from hetbatch.producers.protocol.shm import HOST_SEP, host_queue, host_token
from hetbatch.producers.protocol.wire import FRAMEWORKS, FUSION_QUEUE, queue_for
from hetbatch.producers.settings import DEFAULT_REDIS_URL, env_overrides
from hetbatch.worker.pool import gpu_frameworks

__all__ = ["WorkerSettings"]


@dataclass(frozen=True)
class WorkerSettings:
    """One worker process's knobs (env prefix ``HETBATCH_``). Defaults serve one machine."""

    redis_url: str = DEFAULT_REDIS_URL
    """Broker, registry and result store."""
    redis_login_tries: int = 5
    """Tries of a refused Redis login at start before the worker exits with one line saying so."""
    wait_for_redis: bool = False
    """At start, retry a refused Redis login until it succeeds instead of exiting."""
    prefix: str = DEFAULT_PREFIX
    """Prefix of every hetbatch key in Redis (must match the producers')."""
    pool: str = "cpu"
    """``cpu`` or ``gpu``: which queues this worker consumes."""
    queues: str = ""
    """Comma-separated queues to consume instead of all of the pool's."""
    concurrency: int = 32
    """Task threads: enough tasks in flight for the batcher to coalesce them."""
    prefetch_multiplier: int = 2
    """Messages reserved per thread; concurrency x this many are held unacked."""
    visibility_timeout_s: int = 60
    """Unacked messages of a dead worker are redelivered after this long (live workers renew theirs)."""
    max_batch_rows: int = 8192
    """Rows per model call when the model's entry sets none."""
    max_batch_bytes: int = 64 * 1024 * 1024
    """Most input bytes per model call, whatever ``max_batch_rows`` says (rows padded to
    the call's longest for ragged inputs): 111 images of 3x224x224 float32, not 8,192
    (4.9 GB). Out-of-memory halving stays the safety net below it."""
    max_inflight_bytes: int = 256 * 1024 * 1024
    """Most bytes of tasks in flight at once, each counted as the larger of its input and
    expected output (``worker.budget``): what bounds the worker's memory, not
    ``concurrency`` x chunk size. A task larger than this still runs, alone."""
    max_delay_ms: float = 2.0
    """How long a batch waits for more rows when the model's entry sets none."""
    intra_op_threads: int = 0
    """Threads per model call (0: the framework's default, or 1 when instances > 1)."""
    instances: int = 0
    """Model calls that may run at once per model when the model's entry sets none (0: one
    per CPU core, at most 8, for scikit-learn models on a cpu pool; ONNX models on a cpu
    pool calibrated at load; one otherwise)."""
    result_ttl_s: int = 86_400
    """How long stored results live."""
    notice_inline_bytes: int = 65_536
    """Results up to this size ride in the reply notice (no extra round trip)."""
    max_payload_bytes: int = 256 * 1024 * 1024
    """Largest input payload the worker decodes."""
    task_timeout_s: float = 300.0
    """Longest a task waits for its batch before failing its items."""
    metrics_port: int = 0
    """Prometheus endpoint port (0: off)."""
    metrics_address: str = "0.0.0.0"
    """Interface the Prometheus endpoint listens on."""
    heartbeat_interval_s: float = 5.0
    """How often the worker writes its status (pool, queues, loaded models) to Redis."""
    max_result_bytes: int = 256 * 1024 * 1024
    """Largest value a chunk's result is stored as (a Redis string holds 512 MB at most): a
    larger result is stored in parts of this size and joined by the client
    (``producers.protocol.parts``), never refused."""
    lane_batch: int = 256
    """Most lane jobs (``worker.lane``) taken from Redis at once."""
    lane_slots: int = 4
    """Lane batches running at once (0: this worker does not drain the lanes)."""
    preload: str = ""
    """Comma-separated models (``name`` for the latest version, or ``name@version``) loaded
    and called once on zeros before the worker consumes anything (``hetbatch worker
    --preload``): no job reaches a cold model, and jobs wait in Redis, where a warm worker
    can take them, instead of in this worker while it loads."""
    tracing: bool = False
    """Record OpenTelemetry spans (``producers.protocol.tracing``; needs the ``otel`` extra)."""
    task_events: bool = False
    """Send Celery task events from the start. Off by default: each costs three Redis round
    trips per task, and Flower turns them on by itself while it watches (its enable_events)."""
    task_log: bool = False
    """Log each task received and succeeded at INFO, as Celery does by default. Off: at
    thousands of tasks a second those two lines cost CPU and log volume; errors still log."""
    flower_user: str = ""
    """Flower basic-auth user (``hetbatch flower`` refuses to start without one)."""
    flower_password: str = ""
    """Flower basic-auth password."""
    flower_port: int = 5555
    """Port Flower listens on."""
    restore_interval_s: int = 5
    """How often each worker asks kombu to give back messages past their visibility timeout."""
    lease_interval_s: float = 5.0
    """How often a worker renews the leases on the messages it holds (well below the timeout)."""
    max_hold_s: float = 3600.0
    """Longest a worker renews the lease of one message (a forgotten request comes back after it)."""
    max_attempts: int = 3
    """Starts of a task before it is dead-lettered as a poison job."""
    reconcile: bool = True
    """Run the leader-elected reconciler in this worker (re-publishes lost tasks)."""
    reconcile_interval_s: float = 10.0
    """Seconds between the reconciler's sweeps."""
    overdue_s: float = 30.0
    """Age of a published task after which the reconciler checks that a queue still holds it."""

    shm_dir: str = "/dev/shm"
    """Shared-memory folder for big payloads from producers on this host (``producers.protocol.shm``):
    the worker also consumes its queues' host queues. "" turns it off."""
    shm_ttl_s: int = 86_400
    """Payload files older than this are deleted (as Redis expires an unclaimed input)."""

    def __post_init__(self) -> None:
        if self.pool not in ("cpu", "gpu"):
            raise ValueError(f"pool must be 'cpu' or 'gpu', not {self.pool!r}")
        if self.max_result_bytes < 1:  # 0 divided every result into parts of 0 bytes: each store raised
            raise ValueError(
                f"max_result_bytes must be at least 1 (the size of a result's parts), not {self.max_result_bytes}"
            )
        if self.lease_interval_s * 2 > self.visibility_timeout_s:
            raise ValueError(
                f"lease_interval_s={self.lease_interval_s} must be under half of "
                f"visibility_timeout_s={self.visibility_timeout_s}, or live workers' messages get redelivered"
            )

    @property
    def preload_refs(self) -> list[str]:
        """The models of ``preload``, in order, without blanks."""
        return [ref.strip() for ref in self.preload.split(",") if ref.strip()]

    @property
    def queue_names(self) -> list[str]:
        """The queues this worker consumes: its pool's (or ``queues``), then their host queues."""
        if self.queues:
            names = [q.strip() for q in self.queues.split(",") if q.strip()]
        else:
            if self.pool == "gpu":  # only the frameworks that import here
                names = [queue_for(f, "gpu") for f in FRAMEWORKS if f in gpu_frameworks()]
            else:
                names = [queue_for(f, self.pool) for f in FRAMEWORKS]
            names += [FUSION_QUEUE] if self.pool == "cpu" else []
        token = host_token(self.shm_dir, create=True)
        if token is None:
            return names
        return names + [host_queue(q, token) for q in names if q != FUSION_QUEUE and HOST_SEP not in q]

    @classmethod
    def from_env(cls, **overrides: Any) -> WorkerSettings:
        values = env_overrides(cls)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)
