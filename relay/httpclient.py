"""A streaming HTTP/1.1 client for upstream calls, installed as an `AsyncHTTPClient`.

Why not Tornado's `SimpleAsyncHTTPClient`: it reads a chunked body one chunk at
a time, each through a ``read_until`` and a ``read_bytes`` coroutine, and an
LLM stream is nothing but small chunks; profiled under 1,000 streams that was
half of the relay's CPU. This client is an `asyncio.Protocol`: whatever the
socket holds arrives in one ``data_received`` call, the chunked framing is
decoded in one pass over it (`relay.http1`), and ``streaming_callback`` gets the
whole block.
It also gives what the stock client lacks:

* **Cancellation.** A request may carry a `CancelHandle`; ``cancel()`` aborts
  the socket at once (connected or not) and the fetch ends with
  `UpstreamCancelled`, whatever the upstream is doing.
* **Back-pressure.** If ``streaming_callback`` returns an unfinished awaitable,
  reading pauses (``transport.pause_reading``) until it is done.
* **No queue.** Every fetch connects at once: there is no ``max_clients``
  (Tornado's default of 10 would queue the eleventh user); the relay bounds
  concurrency itself with ``--max-streams``.

Still driven through ``fetch(request, raise_error=False)`` with
``header_callback`` and ``streaming_callback``, like any `AsyncHTTPClient`.
Deliberate limits, since the upstream is an API endpoint: no redirects, no
response decompression (it asks for ``identity``), no proxies, no
``Expect: 100-continue``, one connection per call (``Connection: close``).
"""

from __future__ import annotations

import asyncio
import ssl
import time
import urllib.parse
from io import BytesIO
from typing import Any

from tornado.httpclient import AsyncHTTPClient, HTTPRequest, HTTPResponse
from tornado.httputil import HTTPHeaders
from tornado.simple_httpclient import HTTPStreamClosedError, HTTPTimeoutError

from relay.errors import detached
from relay.http1 import ResponseHead, ResponseParser


class UpstreamCancelled(Exception):
    """The caller let go of the request (`CancelHandle.cancel`)."""


class CancelHandle:
    """Attach as ``request.cancel_handle`` to be able to abort that request at once."""

    __slots__ = ("_reader", "cancelled")

    def __init__(self) -> None:
        self.cancelled = False
        self._reader: _ResponseReader | None = None

    def cancel(self) -> None:
        if not self.cancelled:
            self.cancelled = True
            if self._reader is not None:
                self._reader.fail(UpstreamCancelled())


class StreamingHTTPClient(AsyncHTTPClient):
    """An `AsyncHTTPClient` for long streaming responses; see the module docstring."""

    def initialize(self, defaults: dict[str, Any] | None = None) -> None:
        super().initialize(defaults)
        self.active: set[_ResponseReader] = set()  # requests under way

    def fetch_impl(self, request: HTTPRequest, callback: Any) -> None:
        # Callbacks rather than a coroutine: one task per fetch (the connect) is
        # enough, and a new stream's CPU cost is a benchmark target.
        handle: CancelHandle | None = getattr(request, "cancel_handle", None)
        reader = _ResponseReader(request, asyncio.get_running_loop())
        if handle is not None:
            if handle.cancelled:
                callback(reader.response(UpstreamCancelled()))
                return
            handle._reader = reader
        self.active.add(reader)
        connecting = asyncio.ensure_future(reader.connect())
        connecting.add_done_callback(reader.connected)

        def done(future: asyncio.Future[HTTPResponse]) -> None:
            self.active.discard(reader)
            if handle is not None:
                handle._reader = None  # no handle -> reader -> request -> handle cycle
            connecting.cancel()  # a cancel or timeout while connecting must not wait for it
            callback(future.result())

        reader.done.add_done_callback(done)


def _request_bytes(request: Any, parsed: urllib.parse.SplitResult) -> bytes:
    path = parsed.path or "/"
    if parsed.query:
        path += "?" + parsed.query
    headers = HTTPHeaders(request.headers)
    headers.setdefault("Host", parsed.netloc.rpartition("@")[2])
    headers["Connection"] = "close"
    headers["Accept-Encoding"] = "identity"
    body = request.body or b""
    if body or request.method in ("POST", "PUT", "PATCH"):
        headers["Content-Length"] = str(len(body))
    lines = [f"{request.method} {path} HTTP/1.1"]
    lines += [f"{name}: {value}" for name, value in headers.get_all()]
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    return head + body


class _ResponseReader(asyncio.Protocol):
    """Reads one response: status line and headers, then the body in whatever blocks arrive."""

    def __init__(self, request: Any, loop: asyncio.AbstractEventLoop) -> None:
        self.request = request
        self.loop = loop
        self.done: asyncio.Future[HTTPResponse] = loop.create_future()
        self.start = time.monotonic()
        self.start_wall = time.time()
        self.transport: asyncio.Transport | None = None
        self.code = 0
        self.reason = ""
        self.headers = HTTPHeaders()
        self._parser = ResponseParser()
        self._body: bytearray | None = None if request.streaming_callback else bytearray()
        self._timer: asyncio.TimerHandle | None = None

    # -- connection ---------------------------------------------------------------

    async def connect(self) -> None:
        request = self.request
        parsed = urllib.parse.urlsplit(request.url)
        if parsed.scheme not in ("http", "https"):
            raise ValueError("unsupported URL scheme")
        host = parsed.hostname or ""
        port = parsed.port or (443 if parsed.scheme == "https" else 80)
        context = None
        if parsed.scheme == "https":
            context = ssl.create_default_context()
            if request.validate_cert is False:
                context.check_hostname = False
                context.verify_mode = ssl.CERT_NONE
        if request.request_timeout:
            self._timer = self.loop.call_later(
                request.request_timeout, self.fail, HTTPTimeoutError("Timeout during request")
            )
        try:
            async with asyncio.timeout(request.connect_timeout or None):
                await self.loop.create_connection(lambda: self, host, port, ssl=context)
        except TimeoutError:
            raise HTTPTimeoutError("Timeout while connecting") from None
        if self.done.done():  # cancelled or timed out while connecting
            self.transport.abort()
            return
        self.transport.write(_request_bytes(request, parsed))

    def connected(self, attempt: asyncio.Future) -> None:
        if not attempt.cancelled() and attempt.exception() is not None:
            self.fail(attempt.exception())

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        if self.done.done():
            return
        if self._parser.until_close:
            self._finish()  # a body delimited by the end of the connection
        else:
            self._end(self.response(exc or HTTPStreamClosedError("Stream closed")))

    # -- reading -------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self.done.done():
            return
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
        for line in head.lines[1:]:
            self.headers.parse_line(line)
        header_callback = self.request.header_callback
        if header_callback is not None:
            for line in head.lines:
                header_callback(line + "\r\n")
            header_callback("\r\n")

    def _deliver(self, body: bytes) -> None:
        if self._body is not None:
            self._body += body
            return
        result = self.request.streaming_callback(body)
        if result is not None:
            future = result if asyncio.isfuture(result) else asyncio.ensure_future(result)
            if not future.done():
                self.transport.pause_reading()
                future.add_done_callback(self._resume)

    def _resume(self, future: asyncio.Future) -> None:
        if not self.done.done() and self.transport is not None:
            self.transport.resume_reading()

    # -- the outcome ----------------------------------------------------------------

    def fail(self, error: BaseException) -> None:
        """End the fetch with ``error`` (a 599) and drop the connection now."""
        if not self.done.done():
            self._end(self.response(detached(error)))
        if self.transport is not None:
            self.transport.abort()

    def _finish(self) -> None:
        if self.transport is not None:
            self.transport.close()
        self._end(self.response(None))

    def _end(self, response: HTTPResponse) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None  # it holds self.fail: a cycle otherwise
        if not self.done.done():
            self.done.set_result(response)

    def response(self, error: BaseException | None) -> HTTPResponse:
        return HTTPResponse(
            self.request,
            599 if error is not None else self.code,
            reason=self.reason or None,
            headers=self.headers,
            buffer=BytesIO(self._body) if self._body is not None else None,
            effective_url=self.request.url,
            error=error,
            request_time=time.monotonic() - self.start,
            start_time=self.start_wall,
        )
