"""The floor: what any relay in Python on uvloop pays per stream and per event.

    python -m relay.tools.floor --port=8092 --upstream=http://127.0.0.1:8091

nginx's job in the benchmark (`relay.tools.bench.nginx_conf`: one process passing requests and
answers through, upstream connections kept alive) done by the least Python that can do it: one
`asyncio.Protocol` per client socket that finds a request's head and ``Content-Length`` body and
writes them, unchanged, on a kept-alive upstream connection, and one per upstream connection
that writes every read, unchanged, to the client's socket. No event parsing, chunk rules,
sessions, timeouts, limits or logging, so no relay in Python can cost less per stream or per
event: the bench's ``floor`` target (``--floor``) puts that floor beside nginx and the relay in
one run (docs/benchmarks.md, "Issue 17 in one sitting beside the floor").

With ``--codec`` it also does the relay's own work on each answer with the relay's own code:
de-chunks it (`relay.http1.ResponseParser`), parses its events (`relay.sse.SSEParser`),
applies the chunk rules (`relay.chunks.ChunkRules`), numbers and frames each event
(`relay.sse.encode_event`) and chunks them again: the bench's ``floor-codec`` target, what
that pipeline costs in place, socket to socket, without the relay's HTTP server, sessions and
upstream client around it.

Not a proxy for use: it trusts the client's framing, passes the client's head on as it came (the
fake upstream ignores ``Host``), ends an answer at the read that ends with chunked encoding's
last chunk (true of `relay.tools.fakeupstream`, not of every server), and has no flow control.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence
from typing import cast
from urllib.parse import urlsplit

import uvloop

from relay.chunks import ChunkRules
from relay.http1 import ResponseParser
from relay.limits import raise_fd_limit
from relay.sse import SSEParser, encode_event

_END = b"0\r\n\r\n"  # chunked encoding's last chunk with no trailers
_HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream; charset=utf-8\r\n"
    b"Cache-Control: no-cache\r\nTransfer-Encoding: chunked\r\n\r\n"
)


class _Codec:
    """The relay's work on one answer's bytes: events out of the upstream's, in its framing."""

    def __init__(self) -> None:
        self.http = ResponseParser()
        self.events = SSEParser()
        self.rules = ChunkRules("floor", "floor")
        self.seq = 0

    def feed(self, data: bytes) -> bytes:
        """The bytes for the client that ``data`` completes; ends with `_END` at the end."""
        http = self.http
        started = http.head is not None
        body = http.feed(data)
        out = [] if started or http.head is None else [_HEAD]
        frames = []
        for event in self.events.feed(body) if body else ():
            for text in self.rules.apply(event.data):
                self.seq += 1
                frames.append(encode_event(text, id=self.seq))
        if frames:
            chunk = b"".join(frames)
            out.append(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        if http.done:
            out.append(_END)
        return b"".join(out)


class _Upstream(asyncio.Protocol):
    """One kept-alive connection to the upstream; serves one client request at a time."""

    def __init__(self, proxy: Floor) -> None:
        self.proxy = proxy
        self.client: _Client | None = None
        self.codec: _Codec | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        client = self.client
        if client is None:
            return
        if self.proxy.codec:
            if self.codec is None:
                self.codec = _Codec()
            data = self.codec.feed(data)
        client.write(data)
        if data.endswith(_END):
            self.codec = None
            self.client = None
            self.proxy.idle.append(self)
            client.answered()

    def connection_lost(self, exc: Exception | None) -> None:
        if self in self.proxy.idle:
            self.proxy.idle.remove(self)
        if self.client is not None:
            self.client.close()


class _Client(asyncio.Protocol):
    """One client socket: its requests, one at a time, each on an upstream connection."""

    def __init__(self, proxy: Floor) -> None:
        self.proxy = proxy
        self.buffer = bytearray()
        self.busy = False
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if not self.busy:
            self._next()

    def _next(self) -> None:
        buf = self.buffer
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            return
        head = bytes(buf[: end + 4])
        at = head.lower().find(b"\r\ncontent-length:")
        length = int(head[at + 17 : head.index(b"\r\n", at + 2)]) if at >= 0 else 0
        if len(buf) < end + 4 + length:
            return
        request = bytes(buf[: end + 4 + length])
        del buf[: end + 4 + length]
        self.busy = True
        idle = self.proxy.idle
        if idle:
            self._send(idle.pop(), request)
        else:
            asyncio.ensure_future(self._connect(request))

    async def _connect(self, request: bytes) -> None:
        loop = asyncio.get_running_loop()
        proxy = self.proxy
        _, upstream = await loop.create_connection(lambda: _Upstream(proxy), proxy.host, proxy.port)
        self._send(upstream, request)

    def _send(self, upstream: _Upstream, request: bytes) -> None:
        upstream.client = self
        upstream.transport.write(request)

    def write(self, data: bytes) -> None:
        if self.transport is not None:
            self.transport.write(data)

    def answered(self) -> None:
        self.busy = False
        if self.buffer:
            self._next()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None


class Floor:
    """The proxy's state: where the upstream is and its idle connections."""

    def __init__(self, upstream: str, codec: bool = False) -> None:
        self.codec = codec
        parts = urlsplit(upstream)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80
        self.idle: list[_Upstream] = []

    async def serve(self, port: int) -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(lambda: _Client(self), "127.0.0.1", port, backlog=4096)
        async with server:
            await server.serve_forever()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m relay.tools.floor", description=__doc__)
    parser.add_argument("--port", type=int, required=True, help="loopback port to listen on")
    parser.add_argument("--upstream", required=True, help="the upstream's base URL")
    parser.add_argument("--codec", action="store_true", help="do the relay's work on each event")
    args = parser.parse_args(argv)
    raise_fd_limit()
    uvloop.run(Floor(args.upstream, args.codec).serve(args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
