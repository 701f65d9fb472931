"""Hold under attack: what a client can make the relay spend, each bound tested from outside.

Each test is named after the finding it pins (issue 12). Memory bounds are read
from a real relay process's RSS with generous margins, never exact figures.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable

import pytest
from tornado.iostream import IOStream

from tests.conftest import create_session, fetch_stream
from tests.fakeupstream import answer_frames, send_frames
from tests.processes import RelayProcess

StartRelay = Callable[..., Awaitable[RelayProcess]]


@pytest.fixture
def relay_process(io_loop, tmp_path) -> StartRelay:
    """Start ``server.py`` with flags: ``await relay_process(*args)``; stopped at teardown."""
    started: list[RelayProcess] = []

    async def start(*args: str) -> RelayProcess:
        rp = RelayProcess(list(args), tmp_path / f"relay{len(started)}.log")
        started.append(rp)
        await rp.ready()
        return rp

    yield start
    for rp in started:
        rp.stop()


async def raw_get(port: int, path: str, rcvbuf: int = 4096) -> IOStream:
    """GET ``path`` on a socket with a small receive buffer, and read nothing."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    stream = IOStream(sock)
    await stream.connect(("127.0.0.1", port))
    await stream.write(b"GET %s HTTP/1.1\r\nHost: x\r\n\r\n" % path.encode())
    return stream


@pytest.mark.gen_test(timeout=60)
async def test_reconnecting_readers_do_not_multiply_memory_by_the_session_size(relay_process, fake):
    # One finished session of 7,000 events (~7.8 MB kept), then 200 readers that
    # attach and never read: each may hold one slice (256 KiB) queued, not a copy
    # of the session (before: +1.5 GB).
    tokens = ["x" * 1000] * 7000
    fake.script = send_frames([b"".join(answer_frames(tokens))])
    rp = await relay_process(f"--upstream={fake.url}", "--send-timeout=60")
    created = await create_session(rp)
    whole = await fetch_stream(rp.url + created["streamUrl"], timeout=30)
    assert whole.text() == "".join(tokens)
    before = rp.rss_bytes()
    readers = [await raw_get(rp.port, created["streamUrl"]) for _ in range(200)]
    await asyncio.sleep(2.0)
    grown = rp.rss_bytes() - before
    assert grown < 150 << 20, f"RSS grew {grown >> 20} MiB for 200 stalled readers"
    for reader in readers:
        reader.close()
    # The relay serves normally after.
    again = await fetch_stream(rp.url + created["streamUrl"], timeout=30)
    assert again.text() == "".join(tokens)
