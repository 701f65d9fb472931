"""HTTP/1.1 framing without I/O.

`ResponseParser`: bytes in, the head and the de-framed body out. Shared by the
relay's upstream client (`relay.httpclient`) and the load tester
(`relay.tools.loadtest`): both read long streamed responses from a socket in
whatever blocks arrive, and both want each block's body bytes in one piece.
Handles a status line with headers (skipping interim 1xx responses), then a
body framed by ``Transfer-Encoding: chunked`` (extensions and trailers
ignored), by ``Content-Length``, or by the end of the connection; 204 and 304
have none. One parser reads one response.

`keeps_alive`, `request_body_length` and `response_head`: the server side's
rules (`relay.http1server`), as Tornado's ``HTTP1Connection`` has them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from tornado import httputil
from tornado.http1connection import is_transfer_encoding_chunked, parse_int

MAX_HEAD = 64 << 10  # bytes of status line and headers, and of any one chunk-size line

_HEAD, _CHUNK_SIZE, _CHUNK_DATA, _CHUNK_END, _TRAILER, _LENGTH, _UNTIL_CLOSE, _DONE = range(8)


class ProtocolError(ValueError):
    """The bytes are not a well-formed HTTP/1.1 response."""


@dataclass(frozen=True, slots=True)
class ResponseHead:
    """The status line and headers. ``lines`` are the raw lines, status line first."""

    version: str
    status: int
    reason: str
    lines: tuple[str, ...]
    headers: dict[str, str]  # names in lower case; a repeated header keeps its last value

    @property
    def keep_alive(self) -> bool:
        return self.version == "HTTP/1.1" and "close" not in self.headers.get("connection", "")


class ResponseParser:
    """Feed it the socket's bytes; it returns the body bytes each block holds.

    After a `feed`, ``head`` is set once the head is complete, ``done`` once the
    whole response is in, and ``extra`` holds any bytes that came after it.
    """

    __slots__ = ("_remaining", "_rest", "_state", "done", "extra", "head")

    def __init__(self) -> None:
        self.head: ResponseHead | None = None
        self.done = False
        self.extra = b""
        self._state = _HEAD
        self._rest = b""  # a partial head, size line or chunk end from the last block
        self._remaining = 0  # bytes still due in this chunk, or of the Content-Length body

    @property
    def until_close(self) -> bool:
        """Whether the body ends with the connection (so a close completes it)."""
        return self._state == _UNTIL_CLOSE

    def feed(self, data: bytes) -> bytes:
        """Parse the next block; return the body bytes in it (b"" if none)."""
        if self._state == _DONE:
            self.extra += data
            return b""
        if self._rest:
            data = self._rest + data
            self._rest = b""
        pos = 0
        if self._state == _HEAD:
            pos = self._read_head(data)
            if pos < 0:
                return b""
        state = self._state
        if state == _UNTIL_CLOSE:
            return data[pos:]
        if state == _LENGTH:
            take = min(self._remaining, len(data) - pos)
            body = data[pos : pos + take]
            self._remaining -= take
            pos += take
            if not self._remaining:
                self._finish(data, pos)
            return body
        if state == _DONE:  # a response with no body: _finish kept what follows
            return b""
        return self._read_chunked(data, pos)

    def _read_head(self, data: bytes) -> int:
        """Parse the status line and headers; the position after them, or -1 for more."""
        end = data.find(b"\r\n\r\n")
        if end < 0:
            if len(data) > MAX_HEAD:
                raise ProtocolError("response head too large")
            self._rest = data
            return -1
        lines = data[:end].decode("latin-1").split("\r\n")
        version, _, rest = lines[0].partition(" ")
        code, _, reason = rest.partition(" ")
        if not version.startswith("HTTP/1.") or not (code.isascii() and code.isdigit()):
            raise ProtocolError("malformed status line")
        status = int(code)
        if 100 <= status < 200:  # an interim response: the real one follows
            after = self._read_head(data[end + 4 :])
            return -1 if after < 0 else end + 4 + after
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        self.head = ResponseHead(version, status, reason, tuple(lines), headers)
        length = headers.get("content-length")
        if status in (204, 304):
            self._finish(data, end + 4)
        elif "chunked" in headers.get("transfer-encoding", "").lower():
            self._state = _CHUNK_SIZE
        elif length is not None:
            if not (length.isascii() and length.isdigit()):
                raise ProtocolError("malformed Content-Length")
            self._state = _LENGTH
            self._remaining = int(length)
            if not self._remaining:
                self._finish(data, end + 4)
        else:
            self._state = _UNTIL_CLOSE
        return end + 4

    def _read_chunked(self, data: bytes, pos: int) -> bytes:
        size = len(data)
        pieces = []
        while pos < size:
            state = self._state
            if state == _CHUNK_DATA:
                take = min(self._remaining, size - pos)
                pieces.append(data[pos : pos + take])
                pos += take
                self._remaining -= take
                if not self._remaining:
                    self._state = _CHUNK_END
            elif state == _CHUNK_END:
                if size - pos < 2:
                    self._rest = data[pos:]
                    break
                if not data.startswith(b"\r\n", pos):
                    raise ProtocolError("chunk data not followed by CRLF")
                pos += 2
                self._state = _CHUNK_SIZE
            elif state == _DONE:
                break  # _finish kept what follows the response in ``extra``
            else:  # a chunk-size line, or a trailer line after the last chunk
                eol = data.find(b"\r\n", pos)
                if eol < 0:
                    if size - pos > MAX_HEAD:
                        raise ProtocolError("chunk-size line too long")
                    self._rest = data[pos:]
                    break
                line = data[pos:eol]
                pos = eol + 2
                if state == _TRAILER:
                    if not line:
                        self._finish(data, pos)
                    continue
                try:
                    length = int(line.split(b";", 1)[0], 16)
                except ValueError:
                    raise ProtocolError("malformed chunk-size line") from None
                end = pos + length
                if length and end + 2 <= size and data.startswith(b"\r\n", end):
                    # The common case, a whole chunk in this block: take it at once.
                    pieces.append(data[pos:end])
                    pos = end + 2
                    continue
                self._remaining = length
                self._state = _CHUNK_DATA if length else _TRAILER
        return pieces[0] if len(pieces) == 1 else b"".join(pieces)

    def _finish(self, data: bytes, pos: int) -> None:
        self._state = _DONE
        self.done = True
        self.extra = data[pos:]


def keeps_alive(start: httputil.RequestStartLine, headers: httputil.HTTPHeaders) -> bool:
    """Whether the connection stays open after the response to this request."""
    connection = headers.get("Connection")
    if connection is not None:
        connection = connection.lower()
    if start.version == "HTTP/1.1":
        return connection != "close"
    if (
        "Content-Length" in headers
        or is_transfer_encoding_chunked(headers)
        or start.method in ("HEAD", "GET")
    ):
        return connection == "keep-alive"
    return False


def request_body_length(headers: httputil.HTTPHeaders, limit: int) -> int | None:
    """The request's Content-Length (None without one); `httputil.HTTPInputError` if it
    is not a number, is repeated with different values, or is over ``limit``."""
    if "Content-Length" not in headers:
        return None
    value = headers["Content-Length"]
    if "," in value:  # repeated by a proxy: fine if every copy agrees
        pieces = re.split(r",[ \t]*", value)
        if any(piece != pieces[0] for piece in pieces):
            raise httputil.HTTPInputError(f"Multiple unequal Content-Lengths: {value!r}")
        value = headers["Content-Length"] = pieces[0]
    try:
        length = parse_int(value)
    except ValueError as e:
        raise httputil.HTTPInputError("Only integer Content-Length is allowed") from e
    if length > limit:
        raise httputil.HTTPInputError("Content-Length too long")
    return length


def response_head(
    request: httputil.RequestStartLine,
    request_headers: httputil.HTTPHeaders,
    response: httputil.ResponseStartLine,
    headers: httputil.HTTPHeaders,
    closing: bool,
) -> tuple[bytes, bool, int | None]:
    """A response's head as bytes, whether its body is chunked, and the body bytes due
    (None: not known). ``closing``: the connection closes after this response.
    ``headers`` gains the framing and connection headers; `ValueError` if a header
    holds CR or LF."""
    code = response.code
    chunking = (
        request.version == "HTTP/1.1"
        and request.method != "HEAD"
        and code not in (204, 304)
        and not 100 <= code < 200
        and "Content-Length" not in headers
    )
    if request.version == "HTTP/1.1" and closing:
        headers["Connection"] = "close"
    if (
        request.version == "HTTP/1.0"
        and request_headers.get("Connection", "").lower() == "keep-alive"
    ):
        headers["Connection"] = "Keep-Alive"
    if chunking:
        headers["Transfer-Encoding"] = "chunked"
    expected: int | None = None
    if request.method == "HEAD" or code == 304:
        expected = 0
    elif "Content-Length" in headers:
        expected = parse_int(headers["Content-Length"])
    lines = [f"HTTP/1.1 {code} {response.reason}"]
    lines.extend(f"{name}: {value}" for name, value in headers.get_all())
    for line in lines:
        if "\r" in line or "\n" in line:
            raise ValueError(f"Illegal characters (CR or LF) in header: {line!r}")
    return "\r\n".join(lines).encode("latin1") + b"\r\n\r\n", chunking, expected
