"""The relay's HTTP server: connection budget, shedding, accept pauses, request timeouts.

`make_http_server` builds it, for ``relay/serve.py`` and the tests alike. Each
accepted socket is a `relay.http1server.ServerConnection` (our HTTP/1.1 protocol
in front of the Tornado application; Tornado's own server costs several times
as much per connection). The server adds:

- Bounded bodies: `SMALL_BODY` server-wide (Tornado's default is 100 MB, held
  in memory by every handler that does not stream its body); the POST routes
  raise their own limit from ``prepare()``. A larger ``Content-Length`` anywhere
  else gets a bare ``400 Bad Request`` and a close, before any of the body is
  read (a handler that does not stream its body is not called before the body
  is in).
- A connection budget (`relay.limits.connection_budget`): the descriptor limit
  less a reserve and the upstream descriptors of every allowed stream (two with
  the embedded demo: the relay's socket and the demo server's end). A connection
  accepted over the budget makes room by closing the oldest connection that is
  still sending its request (its headers or body, or idle between two requests),
  the way nginx reuses connections when ``worker_connections`` runs out. When
  every connection is busy (its request read, its response under way), the new
  one gets a canned ``503 at_capacity`` and is closed.
- Accept pauses: when accept() fails for lack of descriptors or memory (EMFILE,
  ENFILE, ENOBUFS, ENOMEM), accepting stops for 0.1 s, doubling up to 1 s while
  it keeps failing. Tornado's own accept handler raises instead, and the
  listening socket stays readable: a traceback on every loop turn.
- Request timeouts, each a total, so that a client sending one byte at a time
  gains nothing: ``--header-timeout`` for a request's headers, from the accept
  for the first request and from the first byte of the next one on a
  kept-alive connection; ``--body-timeout`` for the whole body;
  ``--idle-timeout`` for a kept-alive connection to begin its next request.
  Tornado's own ``idle_connection_timeout`` runs from the end of one response to
  the end of the next headers, idle time and header transfer in one, so it is
  not used; one tick checks every connection that is sending a request.
- Logging: at most one line per `LOG_INTERVAL`, from the tick, with counts (shed,
  refused, accept pauses, malformed requests, header and body timeouts), never one
  per connection or request;
  idle timeouts are normal and only counted in the metrics.

Caveats:

- The tick runs every quarter of the shortest of the three timeouts, at most
  once a second and at least 50 ms apart: a timeout fires up to that late.
- The 503 refusal is one non-blocking send and an immediate close: a client
  whose request arrives after the close may see a reset instead.
- The budget counts descriptors only; with a high limit, memory is the bound.
- The server does not terminate TLS (it never did: run it behind a proxy).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
import time
from collections import Counter, OrderedDict
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from tornado.ioloop import IOLoop, PeriodicCallback
from tornado.web import Application

from relay.config import Settings
from relay.errors import RelayError
from relay.http1server import ServerConnection
from relay.limits import connection_budget, upstream_descriptors
from relay.metrics import Metrics

if TYPE_CHECKING:
    from relay.app import RelayApplication

log = logging.getLogger("relay.connections")

# The body bound of every route that does not set its own.
SMALL_BODY = 8 << 10
# Connections accepted per readable event (Tornado's default backlog, as its own handler).
ACCEPT_BATCH = 128
FIRST_PAUSE, LONGEST_PAUSE = 0.1, 1.0
LOG_INTERVAL = 10.0

# What a connection is doing. The first three are "still sending its request".
HEADERS, BODY, IDLE, BUSY = "headers", "body", "idle", "busy"

# accept(2) passes on errors of the pending connection itself; the man page
# says to treat them like EAGAIN and accept again.
_PER_CONNECTION = frozenset(
    {
        errno.ECONNABORTED,
        errno.EPROTO,
        errno.ENETDOWN,
        errno.ENOPROTOOPT,
        errno.EHOSTDOWN,
        errno.ENONET,
        errno.EHOSTUNREACH,
        errno.EOPNOTSUPP,
        errno.ENETUNREACH,
    }
)


def _canned_503() -> bytes:
    body = RelayError(503, "at_capacity", "the relay is at capacity; retry shortly").body()
    head = (
        "HTTP/1.1 503 Service Unavailable\r\n"
        "Content-Type: application/json; charset=utf-8\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Retry-After: 1\r\n"
        "Connection: close\r\n\r\n"
    )
    return head.encode() + body


AT_CAPACITY = _canned_503()


class ConnectionServer:
    """Accepts for itself (pausing when out of descriptors), keeps connections
    (`relay.http1server.ServerConnection`) within a budget and times out slow or
    idle requests."""

    def __init__(self, app: Application, settings: Settings, metrics: Metrics, budget: int) -> None:
        self.app = app
        self.budget = budget
        self.metrics = metrics
        self._timeouts = {
            HEADERS: settings.header_timeout,
            BODY: settings.body_timeout,
            IDLE: settings.idle_timeout,
        }
        self._conns: set[ServerConnection] = set()
        # Connections still sending a request, oldest first: the shedding order.
        self._pending: OrderedDict[ServerConnection, None] = OrderedDict()
        self._listeners: list[socket.socket] = []
        self._pause = FIRST_PAUSE
        self._paused = False
        self._closing = False
        self._counts: Counter[str] = Counter()  # for the next log line
        self._counted_since = time.monotonic()
        self._reported_at = -LOG_INTERVAL  # the first line goes out at once
        self._tick = PeriodicCallback(self._check, tick_interval(settings) * 1000)
        self._tick.start()
        metrics.bind_connections(lambda: len(self._conns), budget)

    # -- accepting ---------------------------------------------------------

    def add_sockets(self, sockets: Iterable[socket.socket]) -> None:
        for sock in sockets:
            self._listeners.append(sock)
            IOLoop.current().add_handler(sock, self._accept, IOLoop.READ)

    def stop(self) -> None:
        if self._closing:
            return
        self._closing = True
        self._tick.stop()
        for sock in self._listeners:
            IOLoop.current().remove_handler(sock)
            sock.close()

    async def close_all_connections(self) -> None:
        """Close every connection and wait until each has closed."""
        for conn in list(self._conns):
            conn.close()
        deadline = time.monotonic() + 1.0
        while self._conns and time.monotonic() < deadline:
            await asyncio.sleep(0.01)

    def _accept(self, sock: socket.socket, events: int) -> None:
        for _ in range(ACCEPT_BATCH):
            if self._paused:  # by another listening socket's turn in this loop pass
                return
            try:
                client, address = sock.accept()
            except BlockingIOError:
                return
            except OSError as e:
                if e.errno in _PER_CONNECTION:
                    continue
                self._pause_accepting(e)
                return
            self._pause = FIRST_PAUSE
            self._admit(client, address)

    def _pause_accepting(self, error: OSError) -> None:
        name = errno.errorcode.get(error.errno or 0, str(error.errno))
        self.metrics.accept_pauses.labels(name).inc()
        self._counts[f"accept paused ({name})"] += 1
        self._paused = True
        loop = IOLoop.current()
        for sock in self._listeners:
            loop.remove_handler(sock)
        loop.call_later(self._pause, self._resume)
        self._pause = min(self._pause * 2, LONGEST_PAUSE)

    def _resume(self) -> None:
        self._paused = False
        if not self._closing:
            for sock in self._listeners:
                IOLoop.current().add_handler(sock, self._accept, IOLoop.READ)

    def _admit(self, client: socket.socket, address: Any) -> None:
        if len(self._conns) >= self.budget and not self._shed_oldest():
            self._refuse(client)
            return
        # Events must not wait for the next write (Nagle's algorithm); uvloop sets it too,
        # asyncio's own loop does not for an accepted socket.
        with contextlib.suppress(OSError):  # reset already: the connect below finds out
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn = ServerConnection(self, address, SMALL_BODY)
        conn.since = time.monotonic()
        self._conns.add(conn)
        self._pending[conn] = None
        asyncio.ensure_future(self._connect(conn, client))

    async def _connect(self, conn: ServerConnection, client: socket.socket) -> None:
        try:
            await asyncio.get_running_loop().connect_accepted_socket(lambda: conn, client)
        except OSError:
            client.close()
            self.connection_closed(conn)

    def _shed_oldest(self) -> bool:
        if not self._pending:
            return False
        conn = next(iter(self._pending))
        self._close(conn)
        self.metrics.connections_shed.labels(conn.state).inc()
        self._counts[f"shed ({conn.state})"] += 1
        return True

    def _refuse(self, client: socket.socket) -> None:
        self.metrics.connections_refused.inc()
        self._counts["refused 503"] += 1
        with contextlib.suppress(OSError):
            client.setblocking(False)
            client.send(AT_CAPACITY)
        client.close()

    # -- following each connection (called by it) ----------------------------

    def request_begun(self, conn: ServerConnection) -> None:
        """The first bytes of a kept-alive connection's next request: its headers have
        their own timeout from now."""
        if conn.state == IDLE and conn in self._pending:
            conn.state, conn.since = HEADERS, time.monotonic()

    def reading_body(self, conn: ServerConnection) -> None:
        if conn in self._pending:
            conn.state, conn.since = BODY, time.monotonic()

    def bad_request(self) -> None:
        """A malformed request was answered with a bare 400 (counted in the next log line)."""
        self._counts["malformed requests (400)"] += 1

    def busy(self, conn: ServerConnection) -> None:
        conn.state = BUSY
        self._pending.pop(conn, None)

    def idle(self, conn: ServerConnection) -> None:
        """Kept alive after a response: idle until its next request begins."""
        if conn in self._conns:
            conn.state, conn.since = IDLE, time.monotonic()
            self._pending[conn] = None

    def connection_closed(self, conn: ServerConnection) -> None:
        self._conns.discard(conn)
        self._pending.pop(conn, None)

    def _close(self, conn: ServerConnection) -> None:
        """Close now and stop counting it (its connection_lost comes a little later)."""
        self.connection_closed(conn)
        conn.close()

    def _check(self) -> None:
        now = time.monotonic()
        for conn in list(self._pending):
            if now - conn.since > self._timeouts[conn.state]:
                self._close(conn)
                self.metrics.connection_timeouts.labels(conn.state).inc()
                if conn.state != IDLE:
                    self._counts[f"timed out ({conn.state})"] += 1
        if self._counts and now - self._reported_at >= LOG_INTERVAL:
            self._report(now)

    def _report(self, now: float) -> None:
        counts = ", ".join(f"{what} {n}" for what, n in sorted(self._counts.items()))
        only_timeouts = all(what.startswith("timed out") for what in self._counts)
        log.log(
            logging.INFO if only_timeouts else logging.WARNING,
            "connections in the last %.0f s: %s; open %d, budget %d",
            now - self._counted_since,
            counts,
            len(self._conns),
            self.budget,
        )
        self._counts.clear()
        self._counted_since = self._reported_at = now


def tick_interval(settings: Settings) -> float:
    """A quarter of the shortest request timeout, within [50 ms, 1 s]."""
    shortest = min(settings.header_timeout, settings.body_timeout, settings.idle_timeout)
    return min(max(shortest / 4, 0.05), 1.0)


def make_http_server(app: RelayApplication) -> ConnectionServer:
    """The relay's HTTP server for ``app``: call ``add_sockets`` on it to serve."""
    # The settings as the app resolved them (--max-streams fitted to the descriptor limit).
    settings = app.relay.settings
    return ConnectionServer(
        app,
        settings=settings,
        metrics=app.relay.metrics,
        budget=connection_budget(
            settings.max_streams, upstream_descriptors(settings.upstream is None)
        ),
    )
