"""The streaming upstream client (relay.httpclient) against real sockets on loopback."""

from __future__ import annotations

import asyncio
import socket

import pytest
from tornado.httpclient import HTTPRequest
from tornado.simple_httpclient import HTTPStreamClosedError, HTTPTimeoutError

from relay.httpclient import CancelHandle, StreamingHTTPClient, UpstreamCancelled
from tests.conftest import chunked

BODY = "尊敬的用户，\n\n你好 hello".encode() * 50


class RawServer:
    """A one-shot TCP server that answers each connection with ``script(reader, writer)``."""

    def __init__(self, script) -> None:
        self.script = script
        self.requests: list[bytes] = []
        self.closed = asyncio.Event()

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}/v1/chat/completions"

    async def _serve(self, reader, writer) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
        self.requests.append(head + await reader.readexactly(length))
        try:
            await self.script(reader, writer)
        finally:
            writer.close()
            self.closed.set()


async def fetch(url: str, **kwargs):
    received: list[bytes] = []
    headers: list[str] = []
    client = StreamingHTTPClient(force_instance=True)
    handle = kwargs.pop("cancel_handle", None)
    request = HTTPRequest(
        url,
        method="POST",
        body=b'{"q": 1}',
        streaming_callback=kwargs.pop("streaming_callback", received.append),
        header_callback=headers.append,
        **kwargs,
    )
    if handle is not None:
        request.cancel_handle = handle
    try:
        response = await client.fetch(request, raise_error=False)
    except Exception as e:  # noqa: BLE001 - the tests look at what was raised
        return e, b"".join(received), headers
    finally:
        client.close()
    return response, b"".join(received), headers


@pytest.mark.gen_test
@pytest.mark.parametrize("piece", [1, 2, 3, 7, 64, 4096])
async def test_chunked_body_split_anywhere_arrives_exact(piece):
    wire = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + chunked(BODY, 37)

    async def script(reader, writer):
        for i in range(0, len(wire), piece):
            writer.write(wire[i : i + piece])
            await writer.drain()
            await asyncio.sleep(0)

    server = RawServer(script)
    response, body, headers = await fetch(await server.start())
    assert response.code == 200
    assert body == BODY
    assert headers[0] == "HTTP/1.1 200 OK\r\n" and headers[-1] == "\r\n"
    request = server.requests[0]
    assert request.startswith(b"POST /v1/chat/completions HTTP/1.1\r\n")
    assert b"Connection: close\r\n" in request and request.endswith(b'{"q": 1}')


@pytest.mark.gen_test
async def test_content_length_and_close_delimited_bodies():
    async def with_length(reader, writer):
        writer.write(b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 5\r\n\r\nnope!ignored")

    async def until_close(reader, writer):
        writer.write(b"HTTP/1.0 200 OK\r\n\r\n" + BODY)

    response, body, _ = await fetch(await RawServer(with_length).start())
    assert response.code == 401 and body == b"nope!"
    response, body, _ = await fetch(await RawServer(until_close).start())
    assert response.code == 200 and body == BODY


@pytest.mark.gen_test
async def test_interim_100_response_is_skipped():
    async def script(reader, writer):
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

    response, body, _ = await fetch(await RawServer(script).start())
    assert response.code == 200 and body == b"ok"


@pytest.mark.gen_test
async def test_cut_mid_chunk_is_a_closed_stream_error():
    async def script(reader, writer):
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n10\r\nabc")

    error, body, _ = await fetch(await RawServer(script).start())
    assert isinstance(error, HTTPStreamClosedError) and body == b"abc"


@pytest.mark.gen_test
async def test_cancel_while_the_upstream_is_silent_closes_the_socket_at_once():
    async def script(reader, writer):
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        await reader.read()  # returns when the client closes

    server = RawServer(script)
    handle = CancelHandle()
    url = await server.start()
    task = asyncio.ensure_future(fetch(url, cancel_handle=handle))
    await asyncio.sleep(0.2)
    handle.cancel()
    error, _, _ = await asyncio.wait_for(task, 1)
    assert isinstance(error, UpstreamCancelled)
    await asyncio.wait_for(server.closed.wait(), 1)


@pytest.mark.gen_test
async def test_cancel_while_connecting_ends_the_fetch_at_once():
    # A listener that never accepts and has a full backlog: connects hang.
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    for _ in range(8):
        s = socket.socket()
        s.setblocking(False)
        s.connect_ex(("127.0.0.1", port))
        fillers.append(s)
    handle = CancelHandle()
    task = asyncio.ensure_future(
        fetch(f"http://127.0.0.1:{port}/v1", cancel_handle=handle, connect_timeout=30)
    )
    await asyncio.sleep(0.3)
    handle.cancel()
    error, _, _ = await asyncio.wait_for(task, 1)
    assert isinstance(error, UpstreamCancelled)
    for s in [*fillers, listener]:
        s.close()


@pytest.mark.gen_test
async def test_request_timeout_and_refused_connection():
    async def script(reader, writer):
        await reader.read()  # silent until the client gives up

    error, _, _ = await fetch(await RawServer(script).start(), request_timeout=0.3)
    assert isinstance(error, HTTPTimeoutError)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    error, _, _ = await fetch(f"http://127.0.0.1:{port}/v1")
    assert isinstance(error, ConnectionRefusedError)


@pytest.mark.gen_test
async def test_an_unfinished_awaitable_from_the_callback_pauses_reading():
    big = b"x" * (8 << 20)
    sent = {"n": 0}

    async def script(reader, writer):
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(big))
        for i in range(0, len(big), 65536):
            writer.write(big[i : i + 65536])
            await writer.drain()
            sent["n"] += 65536

    gate = asyncio.get_running_loop().create_future()
    got = bytearray()

    def on_chunk(chunk: bytes):
        got.extend(chunk)
        return gate

    task = asyncio.ensure_future(
        fetch(await RawServer(script).start(), streaming_callback=on_chunk)
    )
    await asyncio.sleep(0.5)
    assert len(got) < (1 << 20)  # one read, then nothing until the gate opens
    assert sent["n"] < (6 << 20)
    gate.set_result(None)
    response, _, _ = await asyncio.wait_for(task, 5)
    assert response.code == 200 and len(got) == len(big)


@pytest.mark.gen_test
async def test_oversized_headers_fail_the_fetch():
    async def script(reader, writer):
        writer.write(b"HTTP/1.1 200 OK\r\nX: " + b"a" * (128 << 10) + b"\r\n\r\n")

    error, _, _ = await fetch(await RawServer(script).start())
    assert isinstance(error, ValueError)
