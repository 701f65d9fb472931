"""Idle keep-alive connections to the model server, for `relay.httpclient.StreamingHTTPClient`.

A connection whose response was read to its end waits here for the next request
to the same origin; while it waits, anything the server says or a close drops it.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable


class _Idle(asyncio.Protocol):
    """An idle pooled connection: dropped if the server closes it or says anything."""

    __slots__ = ("dead", "pool", "timer", "transport")

    def __init__(self, pool: ConnectionPool, transport: asyncio.Transport) -> None:
        self.pool = pool
        self.transport = transport
        self.dead = False
        self.timer: asyncio.TimerHandle | None = None

    def drop(self) -> None:
        if not self.dead:
            self.dead = True
            if self.timer is not None:
                self.timer.cancel()
                self.timer = None
            self.transport.abort()

    def data_received(self, data: bytes) -> None:
        self.drop()  # nothing was asked: the connection is out of step

    def eof_received(self) -> bool:
        self.drop()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.drop()
        self.pool.idle_count -= 1


class ConnectionPool:
    """Idle keep-alive connections by origin, the most recently used first.

    Idle plus busy connections (``busy()`` counts the latter, the one being put
    back included) stay within ``max_connections``: a connection put back
    beyond that, or when ``keepalive`` is 0, is closed instead. Each idle
    connection closes itself after ``keepalive`` seconds: servers drop idle
    connections on their own schedule (uvicorn after 5 s, nginx after 75 s), NAT
    boxes without a word, and a request sent on a silently dropped connection
    would wait for nothing.
    """

    def __init__(self, keepalive: float, max_connections: int, busy: Callable[[], int]) -> None:
        self.keepalive = keepalive
        self.max_connections = max_connections
        self.busy = busy
        self.idle_count = 0
        self._idle: dict[tuple[str, str, int], list[_Idle]] = {}
        self._tls: dict[bool, ssl.SSLContext] = {}

    def tls_context(self, verify: bool) -> ssl.SSLContext:
        """The TLS settings for new connections, made once: loading the system's CA
        certificates takes milliseconds, too much to repeat per connection."""
        context = self._tls.get(verify)
        if context is None:
            context = self._tls[verify] = ssl.create_default_context()
            if not verify:
                context.check_hostname = False
                context.verify_mode = ssl.CERT_NONE
        return context

    def take(self, origin: tuple[str, str, int]) -> asyncio.Transport | None:
        """An open idle connection to ``origin``, now owned by the caller, or None."""
        stack = self._idle.get(origin)
        while stack:
            idle = stack.pop()
            if not idle.dead and not idle.transport.is_closing():
                idle.dead = True
                if idle.timer is not None:
                    idle.timer.cancel()
                    idle.timer = None
                self.idle_count -= 1
                return idle.transport
        return None

    def put(self, origin: tuple[str, str, int], transport: asyncio.Transport) -> bool:
        """Keep ``transport`` for reuse; False (and closed) if there is no room for it."""
        full = self.idle_count + self.busy() > self.max_connections
        if self.keepalive <= 0 or full or transport.is_closing():
            transport.close()
            return False
        idle = _Idle(self, transport)
        if not transport.is_reading():
            transport.resume_reading()
        transport.set_protocol(idle)
        idle.timer = asyncio.get_running_loop().call_later(self.keepalive, idle.drop)
        stack = self._idle.setdefault(origin, [])
        if len(stack) > 2 * self.idle_count + 16:
            stack[:] = [i for i in stack if not i.dead]  # the dropped ones, lazily
        stack.append(idle)
        self.idle_count += 1
        return True

    def close(self) -> None:
        for stack in self._idle.values():
            for idle in stack:
                idle.drop()
        self._idle.clear()
