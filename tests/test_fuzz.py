"""Fuzz: random bodies, headers, methods and paths never yield a 500 or a hung request;
raw request bytes no client library would send get HTTP answers (or a close), never a 500;
and a model server answering with bytes of any shape (status, framing, events, cut anywhere)
gets the client a whole event stream, one ending in `event: error`, or a 502/503/504.

The relay runs on its own thread and loop (embedded demo upstream, no delay), so
hypothesis can drive it with a plain blocking client.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import http.client
import json
import logging
import re
import socket
import threading
from collections.abc import Awaitable, Callable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tornado.testing import bind_unused_port

from relay.app import make_app
from relay.config import Settings
from relay.connections import make_http_server
from relay.sse import SSEParser
from tests.fakeupstream import chunk, usage_chunk


class ErrorLog(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.name != "tornado.access":  # 5xx access lines are checked by status
            self.records.append(f"{record.name}: {record.getMessage()}")


@contextlib.contextmanager
def relay_in_a_thread(settings_of: Callable[[int, list[asyncio.Server]], Awaitable[Settings]]):
    """A relay on its own thread and loop, so that hypothesis can drive it with a plain
    blocking client; ``settings_of(port, servers)`` runs on that loop and may start servers
    of its own there (put in ``servers``: they close with the relay). Yields the port and the
    error log."""
    sock, port = bind_unused_port()
    ready = threading.Event()
    box: dict = {}

    def run() -> None:
        async def main() -> None:
            servers: list[asyncio.Server] = []
            app = make_app(await settings_of(port, servers))
            server = make_http_server(app)
            server.add_sockets([sock])
            box["stop"] = asyncio.Event()
            box["loop"] = asyncio.get_running_loop()
            ready.set()
            await box["stop"].wait()
            server.stop()
            for other in servers:
                other.close()
            await app.relay.shutdown(grace=1)

        asyncio.run(main())

    errors = ErrorLog()
    logging.getLogger().addHandler(errors)
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    ready.wait(5)
    try:
        yield port, errors
    finally:
        box["loop"].call_soon_threadsafe(box["stop"].set)
        thread.join(5)
        logging.getLogger().removeHandler(errors)


@pytest.fixture(scope="module")
def threaded_relay():
    async def settings_of(port: int, servers: list[asyncio.Server]) -> Settings:
        return dataclasses.replace(
            Settings(), port=port, demo_token_delay=0.0, auth_tokens={"tok": "alice"}
        )

    with relay_in_a_thread(settings_of) as (port, errors):
        yield port, errors


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=12,
)
ask_like = st.fixed_dictionaries(
    {},
    optional={
        "robotId": json_values | st.sampled_from(["1", "2", 1]),
        "aiQuestion": json_values | st.text(max_size=30),
        "aiQuestionHistory": json_values | st.lists(st.lists(st.text(max_size=5), max_size=3)),
    },
).map(lambda d: json.dumps(d).encode())
bodies = ask_like | st.binary(max_size=200) | json_values.map(lambda v: json.dumps(v).encode())
header_value = st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=40)
headers = st.dictionaries(
    st.sampled_from(
        ["Authorization", "Content-Type", "Last-Event-ID", "Origin", "Accept", "X-Forwarded-For"]
    ),
    header_value | st.sampled_from(["Bearer tok", "Bearer nope", "application/json", "0", "-1"]),
    max_size=4,
)
paths = st.sampled_from(
    [
        "/aianswer/streamAsk",
        "/aianswer/sessions",
        "/aianswer/robots",
        "/aianswer/stream/" + "a" * 32,
        "/aianswer/sessions/" + "b" * 32,
        "/aianswer/stream/xyz",
        "/healthz",
        "/metrics",
        "/",
        "/nope",
        "/aianswer/stream/" + "a" * 32 + "?lastEventId=%00",
    ]
)
methods = st.sampled_from(["GET", "POST", "DELETE", "OPTIONS", "PUT", "PATCH"])


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(method=methods, path=paths, body=bodies, hdrs=headers)
def test_random_requests_never_500_or_hang(threaded_relay, method, path, body, hdrs):
    port, errors = threaded_relay
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(
            method, path, body=body if method in ("POST", "PUT", "PATCH") else None, headers=hdrs
        )
        response = conn.getresponse()
        response.read()  # the whole answer arrives: nothing hangs
    finally:
        conn.close()
    assert response.status < 500, (method, path, body, hdrs, response.status)
    assert errors.records == []


# Raw bytes for the relay's own HTTP/1.1 server (relay/http1server.py): mostly well-formed
# requests with one or two things wrong, alone and with a request pipelined after them.
# (Valid choices come first in each list, and repeats make them likelier.)
EOLS = st.sampled_from([b"\r\n", b"\r\n", b"\r\n", b"\n"])
RAW_METHODS = [b"POST"] * 4 + [b"GET"] * 3 + [b"DELETE", b"OPTIONS", b"HEAD", b"G\x00T", b""]
RAW_TARGETS = [b"/aianswer/streamAsk"] * 4 + [
    b"/aianswer/sessions",
    b"/aianswer/sessions",
    b"/healthz",
    b"/",
    b"*",
    b"http://127.0.0.1/healthz",
    b"/aianswer/stream/" + b"a" * 32,
    b"/%zz",
    b"/\xff",
    b"",
]
RAW_VERSIONS = [b"HTTP/1.1"] * 6 + [b"HTTP/1.0"] * 2 + [b"HTTP/2.0", b"HTTP/1.1 x", b"http/1.1"]
RAW_NAMES = [
    b"Content-Length",
    b"Transfer-Encoding",
    b"Connection",
    b"Expect",
    b"Host",
    b"Authorization",
    b"Content-Type",
    b"Last-Event-ID",
    b"Idempotency-Key",
    b"X-Forwarded-For",
    b"content-length ",
    b"",
]
RAW_VALUES = st.sampled_from(
    [
        b"0",
        b"5",
        b"-1",
        b"1, 1",
        b"99999999999999999999",
        b"+3",
        b" 7 ",
        b"chunked",
        b"chunked, identity",
        b"CHUNKED",
        b"identity",
        b"close",
        b"keep-alive",
        b"100-continue",
        b"Bearer tok",
        b"application/json",
        b"\xff\xfe",
        b"a\x00b",
    ]
) | st.binary(max_size=20)
RAW_HEADER_LINES = st.builds(
    lambda name, value: name + b": " + value, st.sampled_from(RAW_NAMES), RAW_VALUES
) | st.sampled_from([b"no colon", b" folded continuation", b":empty name", b"X" * 200])
ASK = json.dumps({"robotId": "1", "aiQuestion": "hi"}).encode()


@st.composite
def chunked(draw: st.DrawFn, body: bytes) -> bytes:
    """``body`` in chunks of random sizes, and an end that may be cut or malformed."""
    out, rest = b"", body
    while rest:
        n = draw(st.integers(1, len(rest)))
        out += b"%x\r\n%s\r\n" % (n, rest[:n])
        rest = rest[n:]
    end = [b"0\r\n\r\n"] * 4 + [b"0\r\n", b"zz\r\n\r\n", b"-1\r\n\r\n", b""]
    return out + draw(st.sampled_from(end))


@st.composite
def raw_requests(draw: st.DrawFn) -> bytes:
    eol = draw(EOLS)
    line = b" ".join(
        [
            draw(st.sampled_from(RAW_METHODS)),
            draw(st.sampled_from(RAW_TARGETS)),
            draw(st.sampled_from(RAW_VERSIONS)),
        ]
    )
    lines = draw(st.lists(RAW_HEADER_LINES, max_size=1))
    # Mostly (hypothesis favours a list's first choice): an HTTP/1.1 request without a Host
    # is refused before anything else is looked at.
    if draw(st.sampled_from([True, True, True, False])):
        lines.insert(0, b"Host: 127.0.0.1")
    if draw(st.sampled_from([True, False])):
        lines.append(b"Authorization: Bearer tok")
    body = draw(st.sampled_from([ASK, ASK, b""]) | st.binary(max_size=300))
    framing = draw(st.sampled_from(["length", "length", "chunked", "none"]))
    if framing == "length":
        lines.append(b"Content-Length: %d" % len(body))
    elif framing == "chunked":
        lines.append(b"Transfer-Encoding: chunked")
        body = draw(chunked(body))
    raw = eol.join([line, *draw(st.permutations(lines))]) + eol + eol + body
    if draw(st.booleans()):
        raw += b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"  # pipelined after it
    return raw


def _read_until_quiet(sock: socket.socket, quiet: float) -> bytes:
    got = b""
    sock.settimeout(quiet)
    while True:
        try:
            data = sock.recv(65536)
        except TimeoutError:
            return got
        except OSError:  # reset: the relay closed on bytes it had not read
            return got
        if not data:
            return got
        got += data


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(raw=raw_requests(), half_close=st.booleans())
def test_raw_request_bytes_get_http_answers_never_a_500_and_leave_the_server_well(
    threaded_relay, raw, half_close
):
    port, errors = threaded_relay
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        with contextlib.suppress(OSError):  # the relay may close before it has read it all
            sock.sendall(raw)
            if half_close:
                sock.shutdown(socket.SHUT_WR)
        got = _read_until_quiet(sock, 0.2)
    if got:
        assert re.match(rb"HTTP/1\.[01] [1-5]\d\d ", got), (raw, got[:200])
        statuses = re.findall(rb"(?:^|\r\n\r\n|\r\n0\r\n\r\n)HTTP/1\.[01] (\d{3}) ", got)
        assert statuses and all(s[:1] != b"5" for s in statuses), (raw, got[:400])
    assert errors.records == [], raw
    # And the server still answers a plain request.
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", "/healthz")
        assert conn.getresponse().status == 200
    finally:
        conn.close()


# The other side: a model server that answers a streaming call with bytes of any shape
# (relay/httpclient.py, relay/http1.py, relay/sse.py, relay/chunks.py, relay/upstream.py).
class RawUpstream(asyncio.Protocol):
    """Reads one request, answers it with ``box["answer"]``, then closes or stays open."""

    def __init__(self, box: dict) -> None:
        self.box, self.buf = box, b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buf += data
        head, sep, body = self.buf.partition(b"\r\n\r\n")
        length = re.search(rb"(?i)content-length: *(\d+)", head)
        if not sep or len(body) < (int(length.group(1)) if length else 0):
            return
        self.buf = b""
        answer, close = self.box["answer"], self.box["close"]
        for piece in answer:
            self.transport.write(piece)
        if close:
            self.transport.close()


@pytest.fixture(scope="module")
def relay_on_raw_upstream():
    box: dict = {"answer": [], "close": True}

    async def settings_of(port: int, servers: list[asyncio.Server]) -> Settings:
        loop = asyncio.get_running_loop()
        upstream = await loop.create_server(lambda: RawUpstream(box), "127.0.0.1", 0)
        servers.append(upstream)
        up_port = upstream.sockets[0].getsockname()[1]
        return dataclasses.replace(
            Settings(),
            port=port,
            upstream=f"http://127.0.0.1:{up_port}/v1",
            upstream_idle_timeout=0.5,
        )

    with relay_in_a_thread(settings_of) as (port, errors):
        yield port, box, errors


def _data(delta: dict, finish: str | None = None) -> bytes:
    return b"data: " + chunk(delta, finish).encode()


UPSTREAM_EVENTS = st.sampled_from(
    [
        _data({"content": "Hello"}) + b"\n\n",
        _data({"content": "\u4f60\u597d"}) + b"\r\n\r\n",
        _data({"role": "assistant", "content": ""}) + b"\n\n",
        _data({}, "stop") + b"\n\n",
        usage_chunk({"prompt_tokens": 1, "completion_tokens": 2}),
        b"data: [DONE]\n\n",
        b'data: {"error":{"message":"boom"}}\n\n',
        b"data: not json\n\n",
        b"data: [1, 2]\n\n",
        b": keep-alive\n\n",
        b"event: ping\ndata: {}\n\n",
        b"\xef\xbb\xbf" + _data({"content": "bom"}) + b"\n\n",
        b'data: {"choices":[{"delta":{"content":"x"}',  # cut short
        b"retry: 10\nid: 7\n\n",
    ]
) | st.binary(max_size=40)
HEADS = [
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n",
    b"HTTP/1.0 200 OK\r\nContent-Type: text/event-stream\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n",
    b"HTTP/1.1 200 OK\r\n",
    b"HTTP/1.1 500 Internal Server Error\r\nContent-Type: application/json\r\n",
    b"HTTP/1.1 429 Too Many Requests\r\nRetry-After: 1\r\n",
    b"HTTP/1.1 2xx OK\r\n",
    b"garbage\r\n",
]


@st.composite
def upstream_answers(draw: st.DrawFn) -> list[bytes]:
    """A response in the pieces it is written in: head, framing, events, end."""
    body = b"".join(draw(st.lists(UPSTREAM_EVENTS, max_size=8)))
    framing = draw(st.sampled_from(["chunked", "chunked", "length", "close", "bad length"]))
    head = draw(st.sampled_from(HEADS))
    if framing == "chunked":
        head += b"Transfer-Encoding: chunked\r\n"
        body = draw(chunked(body)) if body else b"0\r\n\r\n"
    elif framing == "length":
        head += b"Content-Length: %d\r\n" % len(body)
    elif framing == "bad length":
        head += b"Content-Length: %d\r\n" % (len(body) + draw(st.sampled_from([1, -1, 1000])))
    raw = head + b"\r\n" + body
    cuts = sorted(draw(st.lists(st.integers(0, len(raw)), max_size=3)))
    return [raw[a:b] for a, b in zip([0, *cuts], [*cuts, len(raw)], strict=True)]


@settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(answer=upstream_answers(), close=st.booleans())
def test_any_upstream_answer_gets_the_client_a_whole_stream_or_an_error_never_a_500(
    relay_on_raw_upstream, answer, close
):
    port, box, errors = relay_on_raw_upstream
    box["answer"], box["close"] = answer, close
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("POST", "/aianswer/streamAsk", body=ASK)
        response = conn.getresponse()
        body = response.read()  # it ends: by the upstream's end, an error or its idle timeout
    finally:
        conn.close()
    assert response.status in (200, 502, 503, 504), (answer, response.status, body)
    if response.status == 200:
        events = SSEParser().feed(body + b"\n\n")
        assert events, (answer, body)
        last = events[-1]
        assert last.data == "[DONE]" or last.event == "error", (answer, body)
        ids = [int(e.id) for e in events if e.event == "message" and e.id]
        assert ids == list(range(1, len(ids) + 1)), (answer, body)
    assert errors.records == [], answer
