"""Fuzz: random bodies, headers, methods and paths never yield a 500 or a hung request.

The relay runs on its own thread and loop (embedded demo upstream, no delay), so
hypothesis can drive it with a plain blocking client.
"""

from __future__ import annotations

import asyncio
import dataclasses
import http.client
import json
import logging
import threading

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tornado.testing import bind_unused_port

from relay.app import make_app
from relay.config import Settings
from relay.connections import make_http_server


class ErrorLog(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.name != "tornado.access":  # 5xx access lines are checked by status
            self.records.append(f"{record.name}: {record.getMessage()}")


@pytest.fixture(scope="module")
def threaded_relay():
    sock, port = bind_unused_port()
    ready = threading.Event()
    box: dict = {}

    def run() -> None:
        async def main() -> None:
            settings = dataclasses.replace(
                Settings(), port=port, demo_token_delay=0.0, auth_tokens={"tok": "alice"}
            )
            app = make_app(settings)
            server = make_http_server(app)
            server.add_sockets([sock])
            box["stop"] = asyncio.Event()
            box["loop"] = asyncio.get_running_loop()
            ready.set()
            await box["stop"].wait()
            server.stop()
            await app.relay.shutdown(grace=1)

        asyncio.run(main())

    errors = ErrorLog()
    logging.getLogger().addHandler(errors)
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    ready.wait(5)
    yield port, errors
    box["loop"].call_soon_threadsafe(box["stop"].set)
    thread.join(5)
    logging.getLogger().removeHandler(errors)


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
