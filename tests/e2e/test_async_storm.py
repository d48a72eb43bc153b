"""1,000 concurrent ``AsyncClient.predict`` awaits with the default settings, half of them
on the lane: all answered, each equal to the model in-process, and the client never holds
more Redis connections than its bounded pool allows (issue 16: 100 concurrent awaits used
to raise ``MaxConnectionsError``). tests/e2e/test_async_client.py covers a small pool."""

from __future__ import annotations

import asyncio
import os
import threading
from pathlib import Path

import numpy as np
import psutil

from hetbatch.producers import Client, ClientSettings
from hetbatch.producers.aio import AsyncClient
from hetbatch.worker.devtools.redis_server import RedisServer
from tests.kit.helpers import WorkerProcess, column, register
from tests.kit.models import sklearn_model

AWAITS = 1000


def test_a_thousand_concurrent_awaits_with_default_settings_are_all_answered_right(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    built = sklearn_model(tmp_path / "iris", "storm-iris", "iris")
    with Client.from_url(redis_server.url) as client:
        ref = register(client, built.directory)
    rng = np.random.default_rng(16)
    pieces = [built.X[rng.integers(0, len(built.X), int(rng.integers(1, 40)))] for _ in range(AWAITS)]
    worker = WorkerProcess(redis_server.url, tmp_path, env={"CUDA_VISIBLE_DEVICES": ""})
    me = psutil.Process()
    peak = [0]
    stop = threading.Event()

    def connections() -> int:
        """This process's connections to the Redis (the worker's are not the client's)."""
        return sum(1 for c in me.net_connections("tcp") if c.raddr and c.raddr.port == redis_server.port)

    def watch() -> None:
        while not stop.wait(0.05):
            peak[0] = max(peak[0], connections())

    thread = threading.Thread(target=watch, daemon=True)
    baseline = connections()
    settings = ClientSettings.from_env(redis_url=redis_server.url, lane_max_rows=20)  # ~half take the lane

    async def main() -> list[object]:
        async with AsyncClient(settings) as client:
            return await asyncio.gather(*(client.predict(ref, p, timeout_s=240) for p in pieces))

    try:
        thread.start()
        tables = asyncio.run(main())
    finally:
        stop.set()
        thread.join()
        worker.stop()
    for piece, table in zip(pieces, tables, strict=True):
        np.testing.assert_array_equal(column(table, "label"), built.model.predict(piece))
        np.testing.assert_allclose(column(table, "probabilities"), built.model.predict_proba(piece), atol=1e-6)
    # Bounded: the async pool, plus one sync connection per thread of asyncio's default
    # executor (submits publish through the sync client in ``to_thread``), plus slack of 2.
    bound = settings.async_max_connections + min(32, (os.cpu_count() or 1) + 4) + 2
    assert peak[0] - baseline <= bound, f"{peak[0] - baseline} connections at once, over {bound}"
