"""A streaming HTTP/1.1 client for upstream calls, installed as an `AsyncHTTPClient`.

Why not Tornado's `SimpleAsyncHTTPClient`: it reads a chunked body one chunk at
a time, each through a ``read_until`` and a ``read_bytes`` coroutine, and an
LLM stream is nothing but small chunks; profiled under 1,000 streams that was
half of the relay's CPU. This client is an `asyncio.Protocol`: whatever the
socket holds arrives in one ``data_received`` call, the chunked framing is
decoded in one pass over it (`relay.http1`), and ``streaming_callback`` gets the
whole block.
It also gives what the stock client lacks:

* **Cancellation.** A `StreamingRequest` may carry a `CancelHandle`; ``cancel()``
  aborts the socket at once (connected or not) and the fetch ends with
  `UpstreamCancelled`, whatever the upstream is doing.
* **The parsed head.** A `StreamingRequest`'s ``head_callback`` gets the status
  line and headers once, parsed, before any body (``header_callback`` still
  gets them a line at a time, as Tornado's clients give them).
* **Back-pressure.** If ``streaming_callback`` returns an unfinished awaitable,
  reading pauses (``transport.pause_reading``) until it is done.
* **No queue.** Every fetch connects at once: there is no ``max_clients``
  (Tornado's default of 10 would queue the eleventh user); the relay bounds
  concurrency itself with ``--max-streams``.
* **Keep-alive, when asked for** (``keepalive`` seconds > 0). A connection whose
  response was read to its end (HTTP/1.1, no ``Connection: close``) waits in a
  `relay.pool.ConnectionPool` for the next request to the same origin, at most
  ``keepalive`` seconds, and is dropped at once if the server closes it or
  sends anything meanwhile. Idle plus busy connections stay within
  ``max_connections``. If a reused connection fails before any byte of the
  response arrives (the server closed it as the request went out), the request
  is sent once more on a new connection: the server never answered it. A
  request timeout or a cancel is never retried.

Still driven through ``fetch(request, raise_error=False)`` with
``header_callback`` and ``streaming_callback``, like any `AsyncHTTPClient`, but
``fetch`` takes a URL or a `StreamingRequest`, not a plain `HTTPRequest`.
Deliberate limits, since the upstream is an API endpoint: no redirects, no
response decompression (it asks for ``identity``), no proxies, no
``Expect: 100-continue``, no pipelining (one request per connection at a time).
A request that asks for any of these (`UNSUPPORTED`) is refused with a
`ValueError` naming the option, never quietly served without it.
Without keep-alive every request says ``Connection: close``.
"""

from __future__ import annotations

import asyncio
import time
import urllib.parse
from collections.abc import Callable, Sequence
from io import BytesIO
from typing import Any

from tornado.httpclient import AsyncHTTPClient, HTTPRequest, HTTPResponse
from tornado.httputil import HTTPHeaders
from tornado.simple_httpclient import HTTPStreamClosedError, HTTPTimeoutError

from relay.errors import detached
from relay.http1 import ResponseHead, ResponseParser
from relay.pool import ConnectionPool
from relay.streaming_request import StreamingRequest, refuse_unsupported, request_bytes


class UpstreamCancelled(Exception):
    """The caller let go of the request (`CancelHandle.cancel`)."""


class CancelHandle:
    """Pass as a `StreamingRequest`'s ``cancel_handle`` to be able to abort it at once."""

    __slots__ = ("_reader", "cancelled")

    def __init__(self) -> None:
        self.cancelled = False
        self._reader: _ResponseReader | None = None

    def cancel(self) -> None:
        if not self.cancelled:
            self.cancelled = True
            if self._reader is not None:
                self._reader.fail(UpstreamCancelled())

    def release(self) -> None:
        """The caller needs no more of the body (it has seen the end it wanted).

        The rest is read but not delivered, only so that the connection can be
        kept for reuse; if it has not ended within `RELEASE_GRACE` seconds the
        connection is dropped like a cancel.
        """
        if not self.cancelled and self._reader is not None:
            self._reader.release()


class StreamingHTTPClient(AsyncHTTPClient):
    """An `AsyncHTTPClient` for long streaming responses; see the module docstring.

    ``keepalive``: seconds an idle connection is kept for reuse (0: none, every
    request says ``Connection: close``); ``max_connections`` bounds busy plus
    idle connections (the busy ones are never refused: only idle ones are
    dropped to stay within it).
    """

    def initialize(
        self,
        defaults: dict[str, Any] | None = None,
        keepalive: float = 0.0,
        max_connections: int = 10_000,
    ) -> None:
        super().initialize(defaults)
        self.active: set[_ResponseReader] = set()  # requests under way
        self.pool = ConnectionPool(keepalive, max_connections, lambda: len(self.active))

    def close(self) -> None:
        self.pool.close()
        super().close()

    def fetch(  # type: ignore[override]
        self, request: str | StreamingRequest, raise_error: bool = True, **kwargs: Any
    ) -> asyncio.Future[HTTPResponse]:
        """`AsyncHTTPClient.fetch` for a URL or a `StreamingRequest`.

        Raises TypeError for a plain `HTTPRequest` (it cannot carry a cancel handle
        or a head callback) and ValueError for an option in `UNSUPPORTED`.
        """
        if isinstance(request, str):
            request = StreamingRequest(request, **kwargs)
            kwargs = {}
        elif not isinstance(request, StreamingRequest):
            raise TypeError("StreamingHTTPClient.fetch takes a URL or a StreamingRequest")
        refuse_unsupported(request)
        return super().fetch(request, raise_error, **kwargs)

    def fetch_impl(self, request: HTTPRequest, callback: Any) -> None:
        # Callbacks rather than a coroutine: a task only to open a new connection,
        # none for a reused one; a new stream's CPU cost is a benchmark target.
        # `fetch` let only a StreamingRequest through (here behind Tornado's proxy of it).
        handle: CancelHandle | None = request.cancel_handle  # type: ignore[attr-defined]
        reader = _ResponseReader(request, asyncio.get_running_loop(), self.pool, self.active)
        if handle is not None:
            if handle.cancelled:
                callback(reader.response(UpstreamCancelled()))
                return
            handle._reader = reader
        self.active.add(reader)

        def done(future: asyncio.Future[HTTPResponse]) -> None:
            if handle is not None:
                handle._reader = None  # no handle -> reader -> request -> handle cycle
            callback(future.result())

        reader.done.add_done_callback(done)
        reader.start()


class _Response(HTTPResponse):
    """An `HTTPResponse` whose headers are parsed from the head's lines when first read:
    a streaming caller seldom reads them (it had the parsed head from ``head_callback``),
    and every call ends with a response."""

    def __init__(self, lines: Sequence[str], *args: Any, **kwargs: Any) -> None:
        self._lines = lines
        self._headers: HTTPHeaders | None = None
        kwargs["headers"] = _UNPARSED
        super().__init__(*args, **kwargs)

    @property
    def headers(self) -> HTTPHeaders:
        if self._headers is None:
            self._headers = HTTPHeaders()
            for line in self._lines:
                self._headers.parse_line(line)
        return self._headers

    @headers.setter
    def headers(self, value: HTTPHeaders) -> None:
        self._headers = None if value is _UNPARSED else value


_UNPARSED = HTTPHeaders()  # the headers `_Response` passes to Tornado's constructor


# Seconds a released response may take to end before its connection is dropped.
RELEASE_GRACE = 1.0


class _ResponseReader(asyncio.Protocol):
    """Reads one response: status line and headers, then the body in whatever blocks arrive."""

    __slots__ = (
        "_body",
        "_on_body",
        "_connecting",
        "_origin",
        "_parser",
        "_released",
        "_reused",
        "_timer",
        "_url",
        "active",
        "code",
        "done",
        "loop",
        "pool",
        "reason",
        "request",
        "start_time",
        "start_wall",
        "transport",
    )

    def __init__(
        self,
        request: Any,
        loop: asyncio.AbstractEventLoop,
        pool: ConnectionPool,
        active: set[_ResponseReader],
    ) -> None:
        self.request = request
        self.loop = loop
        self.pool = pool
        self.active = active  # the client's requests under way; this one leaves at its end
        self.done: asyncio.Future[HTTPResponse] = loop.create_future()
        self.start_time = time.monotonic()
        self.start_wall = time.time()
        self.transport: asyncio.Transport | None = None
        self.code = 0
        self.reason = ""
        self._parser = ResponseParser()
        # Read once: ``request`` is Tornado's proxy for its defaults, a lookup per read.
        self._on_body: Callable[[bytes], Any] | None = request.streaming_callback
        self._body: bytearray | None = None if self._on_body else bytearray()
        self._timer: asyncio.TimerHandle | None = None
        self._connecting: asyncio.Future[None] | None = None
        self._reused = False  # on a pooled connection, and nothing received yet
        self._released = False
        self._url = urllib.parse.urlsplit(request.url)
        self._origin = (self._url.scheme, self._url.hostname or "", self._url.port or 0)

    # -- connection ---------------------------------------------------------------

    def start(self) -> None:
        """Send the request on an idle pooled connection, or open a new one."""
        request = self.request
        if request.request_timeout:
            self._timer = self.loop.call_later(request.request_timeout, self._time_out)
        transport = self.pool.take(self._origin)
        if transport is None:
            self._open()
            return
        self._reused = True
        self.transport = transport
        transport.set_protocol(self)
        self._send()

    def _open(self) -> None:
        self._connecting = asyncio.ensure_future(self._connect())
        self._connecting.add_done_callback(self._connected)

    async def _connect(self) -> None:
        parsed = self._url
        if parsed.scheme not in ("http", "https"):
            raise ValueError("unsupported URL scheme")
        host = parsed.hostname or ""
        port = parsed.port or (443 if parsed.scheme == "https" else 80)
        context = None
        if parsed.scheme == "https":
            context = self.pool.tls_context(self.request.validate_cert is not False)
        try:
            async with asyncio.timeout(self.request.connect_timeout or None):
                await self.loop.create_connection(lambda: self, host, port, ssl=context)
        except TimeoutError:
            raise HTTPTimeoutError("Timeout while connecting") from None

    def _connected(self, attempt: asyncio.Future[None]) -> None:
        self._connecting = None
        if attempt.cancelled():
            return
        error = attempt.exception()
        if error is not None:
            self.fail(error)
        elif self.done.done():  # cancelled or timed out while connecting
            self._connection().abort()
        else:
            self._send()

    def _connection(self) -> asyncio.Transport:
        """The transport, once connected (``connection_made`` has set it)."""
        if self.transport is None:
            raise RuntimeError("not connected")
        return self.transport

    def _send(self) -> None:
        self._connection().write(request_bytes(self.request, self._url, self.pool.keepalive > 0))

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        if self.done.done():
            return
        if self._reused:
            # The server closed the pooled connection as the request went out:
            # it never answered, so the request goes again on a new one.
            self._reused = False
            self.transport = None
            self._open()
        elif self._parser.until_close:
            self._finish()  # a body delimited by the end of the connection
        else:
            self._end(self.response(exc or HTTPStreamClosedError("Stream closed")))

    # -- reading -------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self.done.done():
            return
        self._reused = False  # the server answers: a failure now is not a stale connection
        parser = self._parser
        try:
            seen = parser.head is not None
            body = parser.feed(data)
            if not seen and parser.head is not None:
                self._on_head(parser.head)
            if body:
                self._deliver(body)
            if parser.done:
                self._finish()
        except Exception as e:  # noqa: BLE001 - a bad response or a failing callback ends the fetch
            self.fail(e)

    def _on_head(self, head: ResponseHead) -> None:
        self.code, self.reason = head.status, head.reason
        header_callback = self.request.header_callback
        if header_callback is not None:
            for line in head.lines:
                header_callback(line + "\r\n")
            header_callback("\r\n")
        head_callback = self.request.head_callback
        if head_callback is not None:
            head_callback(head)

    def _deliver(self, body: bytes) -> None:
        if self._body is not None:
            self._body += body
            return
        if self._released or self._on_body is None:
            return
        result = self._on_body(body)
        if result is not None:
            future = result if asyncio.isfuture(result) else asyncio.ensure_future(result)
            if not future.done():
                self._connection().pause_reading()
                future.add_done_callback(self._resume)

    def _resume(self, future: asyncio.Future[Any]) -> None:
        if not self.done.done() and self.transport is not None:
            self.transport.resume_reading()

    def release(self) -> None:
        if self._released or self.done.done():
            return
        self._released = True
        if self.transport is not None and not self.transport.is_reading():
            self.transport.resume_reading()
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self.loop.call_later(RELEASE_GRACE, self.fail, UpstreamCancelled())

    # -- the outcome ----------------------------------------------------------------

    def _time_out(self) -> None:
        self.fail(HTTPTimeoutError("Timeout during request"))

    def fail(self, error: BaseException) -> None:
        """End the fetch with ``error`` (a 599) and drop the connection now."""
        if not self.done.done():
            self._end(self.response(detached(error)))
        if self.transport is not None:
            self.transport.abort()

    def _finish(self) -> None:
        """The response is complete: keep the connection for reuse if it may be."""
        transport, head, parser = self.transport, self._parser.head, self._parser
        if transport is not None:
            if head is not None and head.keep_alive and not parser.extra and parser.done:
                self.pool.put(self._origin, transport)
            else:
                transport.close()
        self._end(self.response(None))

    def _end(self, response: HTTPResponse) -> None:
        self.active.discard(self)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None  # it holds self.fail: a cycle otherwise
        if self._connecting is not None:
            self._connecting.cancel()  # a cancel or timeout while connecting must not wait
            self._connecting = None
        if not self.done.done():
            self.done.set_result(response)

    def response(self, error: BaseException | None) -> HTTPResponse:
        head = self._parser.head
        return _Response(
            head.lines[1:] if head is not None else (),
            self.request,
            599 if error is not None else self.code,
            reason=self.reason or None,
            buffer=BytesIO(self._body) if self._body is not None else None,
            effective_url=self.request.url,
            error=error,
            request_time=time.monotonic() - self.start_time,
            start_time=self.start_wall,
        )
