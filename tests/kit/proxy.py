"""A TCP proxy between Redis clients and a redis-server that kills the server mid-round-trip.

It parses the RESP stream both ways, so it knows command boundaries inside a pipeline.
Armed with a point, it counts the commands it forwards and, at that point, lets the
server process exactly the commands forwarded so far (waits for their replies: with
``appendfsync always`` they are on disk by then), holds those replies back from the
client, and calls ``on_kill`` (SIGKILL the server, restart it on its AOF), then drops
every connection: the client sees its round trip cut, as in a crash.

Points: ``before`` the n-th command from now (it is never forwarded) or ``after`` it
(it and all before it are durable, the client has no reply for the last batch).
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable

__all__ = ["KillingProxy", "resp_end"]


def resp_end(buf: bytes | bytearray, i: int) -> int | None:
    """End offset of the RESP message that starts at ``buf[i]``, or None while incomplete."""
    if i >= len(buf):
        return None
    nl = buf.find(b"\r\n", i)
    if nl < 0:
        return None
    kind = buf[i : i + 1]
    if kind in (b"$", b"!", b"="):
        size = int(buf[i + 1 : nl])
        end = nl + 2 + (size + 2 if size >= 0 else 0)
        return end if len(buf) >= end else None
    if kind in (b"*", b"~", b">", b"%", b"|"):
        count = int(buf[i + 1 : nl])
        j: int | None = nl + 2
        for _ in range(max(0, count) * (2 if kind in (b"%", b"|") else 1)):
            assert j is not None
            j = resp_end(buf, j)
            if j is None:
                return None
        return j
    return nl + 2  # simple string, error, integer, RESP3 scalars, or an inline command


class _Conn:
    def __init__(self, client: socket.socket, server: socket.socket) -> None:
        self.client, self.server = client, server
        self.sent = self.answered = 0  # commands forwarded on this connection, replies received
        self.holding = False  # replies are no longer passed to the client
        self.answered_event = threading.Condition()

    def close(self) -> None:
        for sock in (self.client, self.server):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()


class KillingProxy:
    """Listens on a free loopback port (``port``) and forwards to ``upstream_port``.

    Args:
        upstream_port: the redis-server's port (the same across restarts).
        on_kill: kills the server and starts it again; called from a proxy thread.
    """

    def __init__(self, upstream_port: int, on_kill: Callable[[], None]) -> None:
        self.upstream = upstream_port
        self.on_kill = on_kill
        self.forwarded = 0
        self.kills = 0
        self._point: tuple[str, int] | None = None
        self._lock = threading.Lock()
        self._conns: set[_Conn] = set()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._listener.getsockname()[1])
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._stopped = False
        threading.Thread(target=self._accept, daemon=True).start()

    def arm(self, where: str, nth: int) -> None:
        """Kill ``before`` or ``after`` the ``nth`` (1-based) command forwarded from now on."""
        assert where in ("before", "after") and nth >= 1
        with self._lock:
            self._point = (where, self.forwarded + nth)

    def disarm(self) -> bool:
        """Drop the point if it was not reached; returns whether it fired."""
        with self._lock:
            fired = self._point is None
            self._point = None
            return fired

    def close(self) -> None:
        self._stopped = True
        self._listener.close()
        for conn in list(self._conns):
            conn.close()

    def _accept(self) -> None:
        while not self._stopped:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(("127.0.0.1", self.upstream), timeout=1)
                server.settimeout(None)
            except OSError:
                client.close()  # Redis is down: the client's connect fails as it would
                continue
            conn = _Conn(client, server)
            self._conns.add(conn)
            threading.Thread(target=self._up, args=(conn,), daemon=True).start()
            threading.Thread(target=self._down, args=(conn,), daemon=True).start()

    def _up(self, conn: _Conn) -> None:
        """Client to server, one command at a time, counting."""
        buf = bytearray()
        try:
            while True:
                data = conn.client.recv(1 << 16)
                if not data:
                    break
                buf += data
                start = 0
                while (end := resp_end(buf, start)) is not None:
                    if self._forward(conn, bytes(buf[start:end])):
                        return
                    start = end
                del buf[:start]
        except OSError:
            pass
        finally:
            conn.close()
            self._conns.discard(conn)

    def _forward(self, conn: _Conn, command: bytes) -> bool:
        """Send one command on; True once the server was killed at this point."""
        with self._lock:
            self.forwarded += 1
            point = self._point
            hit = point is not None and point[1] == self.forwarded
            if hit:
                self._point = None
        if hit and point is not None and point[0] == "before":
            self._kill(conn)
            return True
        conn.server.sendall(command)
        with conn.answered_event:
            conn.sent += 1
        if hit:
            self._kill(conn)
            return True
        return False

    def _kill(self, conn: _Conn) -> None:
        with conn.answered_event:
            conn.holding = True
            deadline = time.monotonic() + 2.0
            while conn.answered < conn.sent and time.monotonic() < deadline:
                conn.answered_event.wait(0.05)
        self.on_kill()
        self.kills += 1
        for other in list(self._conns):
            other.close()

    def _down(self, conn: _Conn) -> None:
        """Server to client, reply by reply (held back once a kill is under way)."""
        buf = bytearray()
        try:
            while True:
                data = conn.server.recv(1 << 16)
                if not data:
                    break
                buf += data
                start = 0
                while (end := resp_end(buf, start)) is not None:
                    with conn.answered_event:
                        conn.answered += 1
                        if not conn.holding:
                            conn.client.sendall(bytes(buf[start:end]))
                        conn.answered_event.notify_all()
                    start = end
                del buf[:start]
        except OSError:
            pass
        finally:
            conn.close()
