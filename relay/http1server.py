"""One client connection of the relay's HTTP/1.1 server: an asyncio protocol that reads
requests, hands each to the Tornado application and writes its response.

It implements Tornado's `httputil.HTTPConnection`, so every handler runs as on
Tornado's own server, and replaces Tornado's ``HTTP1ServerConnection`` and
``IOStream``: the socket is an event loop transport (uvloop's, in C), the
request is parsed from what one read brought, with no coroutine or future per
step. Tornado's server spent ~0.73 ms of CPU on a one-request connection where a
bare protocol spends ~0.08 ms (docs/perf-changelog.md).

What it keeps of Tornado's HTTP/1.1 behaviour, which the tests pin: headers
parsed by Tornado's own functions (a malformed request line or header, a bad or
doubled Content-Length, Content-Length with Transfer-Encoding, a body over the
limit, a bad chunk: a bare ``400 Bad Request`` and a close); headers at most 64
KiB (more: a close); chunked request bodies (no chunk extensions or trailers);
``Expect: 100-continue``; keep-alive as HTTP/1.1 and 1.0 define it; pipelined
requests served in order; chunked output for an HTTP/1.1 response without a
Content-Length; a response written shorter than its Content-Length closes the
connection, and one written longer is refused (the connection closes before the
excess goes out); a response finished
before its request's body was read ends with a close; a handler whose
``data_received`` returns an awaitable gets no more of the body until it is done.

Caveats:

- A client's end of input (EOF, a half-close) closes the connection: a client
  that half-closes after its request counts as gone, as with nginx.
- While a response runs, and until it has gone to the socket, further requests
  are kept unparsed up to `MAX_PIPELINED` bytes; a client that sends more
  meanwhile is disconnected. So a client that pipelines requests and reads
  nothing holds one response in memory, not one per request.
- Writes go straight to the socket; what it does not take is buffered by the
  transport, and `drained` waits for all of it (a zero high-water mark).
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, cast

from tornado import httputil
from tornado.escape import native_str
from tornado.http1connection import is_transfer_encoding_chunked, parse_hex_int
from tornado.iostream import StreamClosedError

from relay.http1 import keeps_alive, request_body_length, response_head

if TYPE_CHECKING:
    from relay.connections import ConnectionServer

log = logging.getLogger("relay.http")

MAX_HEAD = 64 << 10  # request line and headers (Tornado's default)
MAX_PIPELINED = 256 << 10  # unparsed bytes held while a response runs
CHUNK_LINE = 64  # the longest chunk-size line (Tornado's)

_HEAD_END = re.compile(rb"\r?\n\r?\n")
_BAD_REQUEST = b"HTTP/1.1 400 Bad Request\r\n\r\n"
_CONTINUE = b"HTTP/1.1 100 (Continue)\r\n\r\n"

# What the connection is reading.
_HEAD, _FIXED, _CHUNK_SIZE, _CHUNK_DATA, _CHUNK_END, _LAST_CHUNK_END, _RESPONDING = range(7)


class RequestContext:
    """What `HTTPServerRequest` reads from ``connection.context``."""

    __slots__ = ("address", "protocol", "remote_ip")

    def __init__(self, address: Any) -> None:
        self.address = address
        self.remote_ip = str(address[0]) if isinstance(address, tuple) and address else ""
        self.protocol = "http"

    def __str__(self) -> str:
        return self.remote_ip


class ServerConnection(asyncio.Protocol, httputil.HTTPConnection):
    """One accepted socket: requests in, one at a time, and their responses out.

    The server (`relay.connections.ConnectionServer`) follows what it does
    through `state` and `since`, and is told when a request's headers are in,
    when all of it is, when the connection waits for its next request and when
    it closes.
    """

    def __init__(self, server: ConnectionServer, address: Any, max_body_size: int) -> None:
        self.server = server
        self.context = RequestContext(address)
        self.state = "headers"  # for the server: headers, body, idle or busy
        self.since = 0.0
        self.requests = 0
        self.transport: asyncio.Transport | None = None
        self._default_max_body = max_body_size
        self._buf = b""
        self._reading = _HEAD
        self._hold: Awaitable[None] | None = None  # the delegate's flow control
        self._scanned = 0  # bytes of a partial head searched already
        self._remaining = 0  # bytes due of a fixed body or of a chunk
        self._body_total = 0
        self._drained: asyncio.Future[None] | None = None
        self._closed = False
        self._new_request()

    def _new_request(self) -> None:
        self._delegate: httputil.HTTPMessageDelegate | None = None
        self._start: httputil.RequestStartLine | None = None
        self._headers: httputil.HTTPHeaders | None = None
        self._max_body = self._default_max_body
        self._close_callback: Callable[[], None] | None = None
        self._disconnect_on_finish = False
        self._read_finished = False
        self._write_finished = False
        self._chunking = False
        self._expected: int | None = None

    # -- asyncio.Protocol --------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        if self._closed:  # shed before it was connected
            self.transport.close()
            return
        self.transport.set_write_buffer_limits(high=0)  # told as soon as anything waits

    def data_received(self, data: bytes) -> None:
        if self._closed:
            return
        self._buf = self._buf + data if self._buf else data
        if self.state == "idle":
            self.server.request_begun(self)
        if self._hold is None:
            self._process()
        if len(self._buf) > MAX_PIPELINED:  # unread while a response or a handler waits
            self.close()

    def eof_received(self) -> bool:
        return False  # a half-close counts as gone: close

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self._buf = b""
        delegate, callback = self._delegate, self._close_callback
        self._delegate = self._close_callback = None
        if delegate is not None:  # while its request was being read
            self._call(delegate.on_connection_close)
        elif callback is not None:  # while its response was being written
            self._call(callback)
        self._wake_drain()
        self.server.connection_closed(self)

    def pause_writing(self) -> None:
        if self._drained is None:
            self._drained = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        self._wake_drain()

    # -- what the relay's own writer uses ----------------------------------

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self, when_sent: bool = False) -> None:
        """Close now, dropping what the socket has not taken (as Tornado's IOStream does:
        a client that does not read must not hold the connection open); ``when_sent``:
        once the transport has sent what it holds (the end of a response)."""
        if not self._closed:
            self._closed = True
            if self.transport is not None:
                (self.transport.close if when_sent else self.transport.abort)()

    def send(self, data: bytes) -> bool:
        """Write ``data`` (framed already); True when the socket took all of it."""
        if self._closed or self.transport is None:
            raise StreamClosedError()
        self.transport.write(data)
        return self._drained is None

    def drained(self) -> asyncio.Future[None]:
        """Resolves when every byte written has gone to the socket; raises
        `StreamClosedError` if the connection closes first."""
        if self._drained is not None and not self._closed:
            return self._drained
        future = asyncio.get_running_loop().create_future()
        if self._closed:
            future.set_exception(StreamClosedError())
            future.exception()  # retrieved: a write nobody awaits must not be logged
        else:
            future.set_result(None)
        return future

    def _wake_drain(self) -> None:
        future, self._drained = self._drained, None
        if future is not None and not future.done():
            if self._closed:
                future.set_exception(StreamClosedError())
                future.exception()  # retrieved: nobody may be waiting
            else:
                future.set_result(None)

    # -- reading requests --------------------------------------------------

    def _process(self) -> None:
        try:
            while self._buf and self._hold is None and not self._closed:
                reading = self._reading
                if reading == _HEAD:
                    if not self._read_head():
                        return
                elif reading in (_FIXED, _CHUNK_DATA):
                    self._take()
                elif reading == _RESPONDING:
                    return
                elif not self._read_chunked():
                    return
        except httputil.HTTPInputError:
            self._bad_request()

    def _read_head(self) -> bool:
        buf = self._buf.lstrip(b"\r\n")  # empty lines before a request are ignored
        # From where the last search stopped: a head sent a byte at a time costs one
        # pass over it, not one per byte.
        end = _HEAD_END.search(buf, max(self._scanned - 3, 0), MAX_HEAD + 4)
        if end is None:
            self._buf, self._scanned = buf, len(buf)
            if len(buf) > MAX_HEAD:
                self.close()
            return False
        self._buf, self._scanned = buf[end.end() :], 0
        text = native_str(buf[: end.start()].decode("latin1"))
        eol = text.find("\n")
        line = text if eol < 0 else text[:eol]
        start = httputil.parse_request_start_line(line.rstrip("\r"))
        headers = httputil.HTTPHeaders.parse("" if eol < 0 else text[eol:])
        self._start, self._headers = start, headers
        self._disconnect_on_finish = not keeps_alive(start, headers)
        self.requests += 1
        self.server.reading_body(self)
        delegate = self._delegate = self.server.app.start_request(self, self)
        self._reading = _RESPONDING  # nothing is read until the body's framing is known
        held = self._call(delegate.headers_received, start, headers)
        if self._closed:
            return False
        if held is not None and not _done(held):
            self._hold_for(held, self._begin_body)
            return False
        self._begin_body()
        return True

    def _begin_body(self) -> None:
        headers = cast(httputil.HTTPHeaders, self._headers)
        if headers.get("Expect") == "100-continue" and not self._write_finished:
            self.send(_CONTINUE)
        length = request_body_length(headers, self._max_body)
        if is_transfer_encoding_chunked(headers):
            self._reading, self._body_total = _CHUNK_SIZE, 0
        elif length:
            self._reading, self._remaining = _FIXED, length
        else:
            self._body_done()

    def _take(self) -> None:
        """Body bytes that are due: of the Content-Length body, or of one chunk."""
        take = min(len(self._buf), self._remaining)
        data, self._buf = self._buf[:take], self._buf[take:]
        self._remaining -= take
        whole = self._reading == _FIXED
        if not self._remaining:  # a whole body is done once the delegate has taken it
            self._reading = _RESPONDING if whole else _CHUNK_END
        self._deliver(data)
        if whole and not self._remaining and self._hold is None:
            self._body_done()

    def _read_chunked(self) -> bool:
        """One step of a chunked body; False when the next line is not all in yet."""
        buf = self._buf
        reading = self._reading
        end = buf.find(b"\r\n", 0, CHUNK_LINE + 2)
        if end < 0:
            if len(buf) > CHUNK_LINE:
                raise httputil.HTTPInputError("chunk size line too long")
            return False
        line, self._buf = buf[:end], buf[end + 2 :]
        if reading == _CHUNK_SIZE:
            try:
                size = parse_hex_int(native_str(line.decode("latin1")))
            except ValueError as e:
                raise httputil.HTTPInputError("invalid chunk size") from e
            if size == 0:
                self._reading = _LAST_CHUNK_END
                return True
            self._body_total += size
            if self._body_total > self._max_body:
                raise httputil.HTTPInputError("chunked body too large")
            self._reading, self._remaining = _CHUNK_DATA, size
        elif line:
            raise httputil.HTTPInputError("improperly terminated chunk")
        elif reading == _CHUNK_END:
            self._reading = _CHUNK_SIZE
        else:  # _LAST_CHUNK_END
            self._body_done()
        return True

    def _deliver(self, data: bytes) -> None:
        delegate = self._delegate
        if delegate is None or self._write_finished:
            return  # a response sent before the body: what is left is dropped
        held = self._call(delegate.data_received, data)
        if held is not None and not _done(held):
            self._hold_for(held, None)

    def _hold_for(self, held: Awaitable[None], then: Callable[[], None] | None) -> None:
        future = asyncio.ensure_future(held)
        self._hold = future

        def resume(done: asyncio.Future[None]) -> None:
            self._hold = None
            if self._closed or done.cancelled() or done.exception() is not None:
                return
            try:
                if then is not None:
                    then()
                elif self._reading == _RESPONDING and not self._read_finished:
                    self._body_done()
            except httputil.HTTPInputError:
                self._bad_request()
                return
            self._process()

        future.add_done_callback(resume)

    def _body_done(self) -> None:
        self._read_finished = True
        self._reading = _RESPONDING
        self.server.busy(self)
        delegate, self._delegate = self._delegate, None
        if self._write_finished:  # answered before the body: the close follows the answer
            return
        if delegate is not None:
            self._call(delegate.finish)

    def _bad_request(self) -> None:
        # Counted, not logged: the error quotes the client's bytes (a header value may be
        # a token), and a line per request would let any client grow the log.
        self.server.bad_request()
        if not self._closed and self.transport is not None:
            self.transport.write(_BAD_REQUEST)
        self.close(when_sent=True)

    def _call(self, method: Callable[..., Any], *args: Any) -> Any:
        """A delegate's method; one that raises is logged and closes the connection. But an
        `HTTPInputError` (Tornado's request refuses a missing, invalid or repeated Host) goes
        on to the reader, whose answer is the bare 400 that Tornado's server gives."""
        try:
            return method(*args)
        except httputil.HTTPInputError:
            raise
        except Exception:
            log.exception("Uncaught exception in the request's handler")
            self.close()
            return None

    # -- httputil.HTTPConnection ---------------------------------------------

    def set_close_callback(self, callback: Callable[[], None] | None) -> None:
        self._close_callback = callback

    def set_max_body_size(self, max_body_size: int) -> None:
        self._max_body = max_body_size

    def write_headers(
        self,
        start_line: httputil.RequestStartLine | httputil.ResponseStartLine,
        headers: httputil.HTTPHeaders,
        chunk: bytes | None = None,
    ) -> asyncio.Future[None]:
        request = cast(httputil.RequestStartLine, self._start)
        response = cast(httputil.ResponseStartLine, start_line)
        data, self._chunking, self._expected = response_head(
            request,
            cast(httputil.HTTPHeaders, self._headers),
            response,
            headers,
            self._disconnect_on_finish,
        )
        if chunk:
            data += self._frame(chunk)
        return self._write(data)

    def write(self, chunk: bytes) -> asyncio.Future[None]:
        return self._write(self._frame(chunk))

    def finish(self) -> None:
        expected = self._expected
        if expected and not self._closed:
            self.close()
            raise httputil.HTTPOutputError(
                f"Tried to write {expected} bytes less than Content-Length"
            )
        if self._chunking and not self._closed and self.transport is not None:
            self.transport.write(b"0\r\n\r\n")
        self._write_finished = True
        self._close_callback = None
        if not self._read_finished:
            self._disconnect_on_finish = True  # the only way not to read the whole body
        if self._disconnect_on_finish:
            self.close(when_sent=True)
        elif self._drained is not None:
            # The next request is read once this response is out: a client that sends
            # requests and reads nothing holds one response, not one per request.
            self._drained.add_done_callback(lambda _: self._next_request())
        elif not self._closed:
            asyncio.get_running_loop().call_soon(self._next_request)

    def _next_request(self) -> None:
        if self._closed:
            return
        self._new_request()
        self._reading = _HEAD
        self.server.idle(self)
        if self._buf:
            self.server.request_begun(self)
            self._process()

    def _frame(self, chunk: bytes) -> bytes:
        if self._expected is not None:
            self._expected -= len(chunk)
            if self._expected < 0:
                self.close()
                raise httputil.HTTPOutputError("Tried to write more data than Content-Length")
        if self._chunking and chunk:
            return b"%x\r\n%b\r\n" % (len(chunk), chunk)
        return chunk

    def _write(self, data: bytes) -> asyncio.Future[None]:
        if self._closed or self.transport is None:
            return self.drained()  # fails with StreamClosedError
        if data:
            self.transport.write(data)
        return self.drained()


def _done(awaitable: Awaitable[None]) -> bool:
    return isinstance(awaitable, asyncio.Future) and awaitable.done()
