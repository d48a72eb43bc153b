"""The worker's patched kombu transport survives Celery 5.7's teardown of a lost broker
connection (``Consumer.on_connection_error_after_connected``: ``collect()``, then
``close()``) when a channel still holds unacked messages.

Seen in a Sentinel failover: ``collect()`` caught a socket timeout raised inside the
channel's close, detached the transport anyway, and the later ``close()`` closed the
channel for real; restoring its unacked messages then built a pool from the detached
transport: AttributeError, "Unrecoverable error", a worker that never consumed again.
The timeout's timing cannot be forced, so the test detaches the transport the way
``collect()`` does after it; the redis-server is real and killed with the message unacked.
"""

from __future__ import annotations

from kombu import Connection, Queue

from hetbatch.producers.protocol.kombu import patch_worker_transport
from hetbatch.worker.devtools.redis_server import RedisServer


def test_a_channel_with_unacked_messages_closes_after_its_transport_was_detached() -> None:
    patch_worker_transport()
    server = RedisServer()
    try:
        conn = Connection(f"redis://127.0.0.1:{server.port}/0")
        queue = Queue("close-twice", routing_key="close-twice")
        with conn.Producer() as producer:
            producer.publish({"n": 1}, routing_key="close-twice", declare=[queue], serializer="json")
        channel = conn.default_channel
        message = channel.basic_get("close-twice", no_ack=False)
        assert message is not None and channel.qos._delivered  # held unacked, as by a worker
    finally:
        server.kill()
    conn._do_close_transport()  # what collect() does after a timeout cut the channel's close short
    conn.close()  # Celery closes it next: must not raise (kombu ignores connection errors here)
