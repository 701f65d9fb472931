"""Client streams on sockets of their own, for tests that need what Tornado's client hides:
a small receive buffer, a chosen source address, a request sent as written, the response's
framing and events as they arrive."""

from __future__ import annotations

import asyncio
import json
import socket
import time

from tornado.iostream import IOStream, StreamClosedError

from relay.http1 import ResponseHead, ResponseParser
from relay.sse import ServerSentEvent, SSEParser
from tests.conftest import ASK, fetch_stream
from tests.fakeupstream import gated
from tests.processes import RelayProcess

KEY = "k-0123456789abcdef"
BODY = json.dumps(ASK, ensure_ascii=False).encode()


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def keyed(key: str = KEY, **more: str) -> dict[str, str]:
    """Request headers with an ``Idempotency-Key`` (and ``more``)."""
    return {"Idempotency-Key": key, **more}


def error_code(event: ServerSentEvent) -> str:
    """The ``error.code`` of an ``event: error``."""
    assert event.event == "error", event
    return json.loads(event.data)["error"]["code"]


async def raw_connection(
    url: str, request: bytes, rcvbuf: int | None = None, source: str | None = None
) -> IOStream:
    """A connection of its own to the server at ``url`` that has sent ``request``; nothing
    is read. ``rcvbuf`` shrinks its receive buffer (so it fills after a few KiB); ``source``
    is the address it connects from (the relay tells anonymous clients apart by address)."""
    sock = socket.socket()
    if rcvbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    if source:
        sock.bind((source, 0))
    stream = IOStream(sock)
    await stream.connect(("127.0.0.1", port_of(url)))
    await stream.write(request)
    return stream


async def open_raw_stream(rs, body: dict = ASK, rcvbuf: int | None = None) -> IOStream:
    """POST streamAsk to ``rs`` (anything with a ``url``) on a raw socket and return it
    without reading the answer."""
    data = json.dumps(body).encode()
    request = (
        b"POST /aianswer/streamAsk HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(data), data)
    )
    return await raw_connection(rs.url, request, rcvbuf)


class RawStream:
    """A streamAsk POST on a socket of its own (from ``source``), its response parsed as
    it arrives: the HTTP framing by `ResponseParser`, the events by `SSEParser`."""

    def __init__(self, stream: IOStream) -> None:
        self.stream = stream
        self.response = ResponseParser()
        self.parser = SSEParser()
        self.events: list[ServerSentEvent] = []
        self.body = b""
        self.closed = False

    @classmethod
    async def open(
        cls,
        url: str,
        key: str | None = KEY,
        body: bytes = BODY,
        headers: dict[str, str] | None = None,
        source: str = "127.0.0.1",
        rcvbuf: int | None = None,
    ) -> RawStream:
        lines = [
            "POST /aianswer/streamAsk HTTP/1.1",
            "Host: x",
            "Content-Type: application/json",
            f"Content-Length: {len(body)}",
        ]
        if key is not None:
            lines.append(f"Idempotency-Key: {key}")
        lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
        request = ("\r\n".join(lines) + "\r\n\r\n").encode() + body
        return cls(await raw_connection(url, request, rcvbuf, source))

    @property
    def head(self) -> ResponseHead:
        assert self.response.head is not None
        return self.response.head

    async def read(self) -> bool:
        """Read one block; False once the response or the connection has ended."""
        if self.response.done or self.closed:
            return False
        try:
            block = await asyncio.wait_for(self.stream.read_bytes(65536, partial=True), 10)
        except StreamClosedError:
            self.closed = True
            return False
        body = self.response.feed(block)
        self.body += body
        self.events += self.parser.feed(body)
        return True

    async def until_id(self, last: int) -> None:
        while str(last) not in (e.id for e in self.events):
            assert await self.read(), f"the stream ended before event {last}"

    async def until_head(self) -> ResponseHead:
        while self.response.head is None:
            assert await self.read(), "no response head"
        return self.head

    async def to_end(self) -> list[ServerSentEvent]:
        while await self.read():
            pass
        return self.events

    def close(self) -> None:
        self.stream.close()


# Answers in the store tests: 40 tokens, so that a drop falls mid-answer.
ANSWER_TOKENS = [f"片段{i} " for i in range(40)]


def ids(res) -> list[int]:
    return [int(e.id) for e in res.events if e.id]


async def resume_through_503s(url: str, last_id: int, limit: float) -> tuple[object, float]:
    """GET ``url`` with ``Last-Event-ID`` until it is not 503 ``store_unavailable``; the
    response and how long the 503s lasted (each answered within the store's deadline)."""
    began = time.monotonic()
    while True:
        asked = time.monotonic()
        res = await fetch_stream(url, headers={"Last-Event-ID": str(last_id)}, timeout=30)
        if res.status != 503:
            return res, time.monotonic() - began
        assert res.json()["error"]["code"] == "store_unavailable"
        assert time.monotonic() - asked < 4  # never hangs: the store's 3 s deadline
        assert time.monotonic() - began < limit, "still 503 after the failover time"
        await asyncio.sleep(0.2)


async def read_until_id(rp: RelayProcess, path: str, last_id: int) -> bytes:
    stream = IOStream(socket.socket())
    await stream.connect(("127.0.0.1", rp.port))
    await stream.write(b"GET %s HTTP/1.1\r\nHost: x\r\n\r\n" % path.encode())
    data = await stream.read_until(b"id: %d\n" % last_id)
    stream.close()
    return data


async def keyed_reader_moves_to_b_and_leaves(a: RelayProcess, b: RelayProcess, fake) -> float:
    """A keyed answer on relay ``a`` (its upstream stops after event 3) is read there, then
    by a repeat on ``b``, which outlives ``a``'s resume grace (0.5 s) without the answer
    being cancelled, then leaves too. Returns when it left (``time.monotonic()``)."""
    fake.script = gated(ANSWER_TOKENS, 3, asyncio.Event(), finish=False)  # then nothing
    first = await RawStream.open(a.url)
    await first.until_id(3)
    first.close()
    second = await RawStream.open(b.url, headers={"Last-Event-ID": "3"})
    await second.until_head()
    await asyncio.sleep(0.8)  # A's grace has passed (nothing to await: nothing happens): B reads it
    assert not fake.disconnected.is_set()
    second.close()
    return time.monotonic()
