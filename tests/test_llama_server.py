"""The relay in front of a real llama.cpp ``llama-server`` (issue 13).

The server is built once by ``.ci/build-llama-server`` (cached outside the clone) and serves a
tiny random-weight llama written at test time (``tests/llama.py``; the fixtures are in
``tests/conftest.py``), so its text is gibberish but its HTTP, framing, chunk shapes, errors and
connection handling are the real server's. Every relay here is a real ``server.py`` process.
"""

from __future__ import annotations

import asyncio
import json
import re
import time

import pytest

from relay.ask import Ask
from relay.config import load_settings
from relay.http1 import ResponseParser
from relay.sse import SSEParser
from relay.upstream import build_payload
from tests.conftest import StreamResult, eventually, fetch_stream
from tests.llama import CTX, established

CONF = """\
model = "tiny"

[[robots]]
robotId = "1"
robotName = "tiny llama"
systemPrompt = "You are a test."
temperature = 0.0
"""
QUESTION = "Tell me a long story about a lighthouse."


@pytest.fixture
def conf(tmp_path) -> str:
    path = tmp_path / "relay.conf"
    path.write_text(CONF)
    return str(path)


async def relay_for(relay_process, conf: str, llama):
    return await relay_process(f"--upstream={llama.url}/v1", f"--config={conf}")


def contents(res: StreamResult) -> list[str]:
    """The ``delta.content`` of every chunk that has one, in order."""
    out = []
    for data in res.data:
        if data != "[DONE]":
            for choice in json.loads(data)["choices"]:
                if choice["delta"].get("content"):
                    out.append(choice["delta"]["content"])
    return out


def finish(res: StreamResult) -> dict:
    """The first choice of the chunk that carries a ``finish_reason``."""
    for data in res.data:
        if data != "[DONE]":
            choice = json.loads(data)["choices"][0]
            if choice.get("finish_reason"):
                return choice
    raise AssertionError(f"no finish chunk in {res.data}")


@pytest.mark.gen_test(timeout=60)
async def test_relayed_text_equals_a_direct_call_at_temperature_0(
    relay_process, conf, llama_server
):
    rp = await relay_for(relay_process, conf, llama_server)
    relayed = await fetch_stream(
        rp.url + "/aianswer/streamAsk", {"robotId": "1", "aiQuestion": QUESTION}
    )
    assert relayed.status == 200, relayed.raw
    assert relayed.data[-1] == "[DONE]"

    # The same request body the relay sent, straight to llama-server.
    settings = load_settings([f"--config={conf}"], environ={})
    payload = build_payload(settings.robot("1"), settings.model, Ask("1", QUESTION))
    assert json.loads(payload)["temperature"] == 0
    direct = await fetch_stream(llama_server.url + "/v1/chat/completions", payload)
    assert direct.status == 200, direct.raw
    assert direct.data[-1] == "[DONE]"

    assert len(contents(direct)) > 10  # tokens come one chunk each
    assert contents(relayed) == contents(direct)
    assert relayed.text() == direct.text()
    # -n 48: llama-server ends with "length"; the relay puts its business node there.
    assert finish(direct)["finish_reason"] == finish(relayed)["finish_reason"] == "length"
    assert set(finish(relayed)["delta"]) == {"userId", "aiId", "occurTime"}


async def read_first_text_then_leave(port: int) -> str:
    """POST a one-shot question on a raw connection, read until the first relayed text, then
    close the connection (the client leaves mid-answer)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    body = json.dumps({"robotId": "1", "aiQuestion": QUESTION}).encode()
    writer.write(
        b"POST /aianswer/streamAsk HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
    )
    http, sse = ResponseParser(), SSEParser()
    try:
        while True:
            data = await asyncio.wait_for(reader.read(65536), 10)
            assert data, "the relay closed the stream before any text"
            for event in sse.feed(http.feed(data)):
                if event.data != "[DONE]":
                    delta = json.loads(event.data)["choices"][0]["delta"]
                    if delta.get("content"):
                        return delta["content"]
    finally:
        writer.close()


@pytest.mark.gen_test(timeout=60)
async def test_client_leaving_closes_the_upstream_socket_within_a_second(
    relay_process, conf, llama_server_endless
):
    llama = llama_server_endless
    rp = await relay_for(relay_process, conf, llama)
    assert await read_first_text_then_leave(rp.port)
    left = time.monotonic()
    # The answer is still being generated (20,000 tokens at most), on one upstream socket.
    assert llama.processing()
    assert established(rp.proc.pid, llama.port) == 1
    await eventually(lambda: established(rp.proc.pid, llama.port) == 0, timeout=1.0)
    closed_after = time.monotonic() - left
    # llama-server notices the closed socket and stops generating.
    await eventually(lambda: not llama.processing(), timeout=5.0)
    assert closed_after < 1.0
    assert rp.serving()


@pytest.mark.gen_test(timeout=60)
async def test_prompt_longer_than_the_context_is_a_502_with_the_servers_message(
    relay_process, conf, llama_server
):
    rp = await relay_for(relay_process, conf, llama_server)
    question = " ".join(["lighthouse"] * CTX * 2)
    res = await fetch_stream(
        rp.url + "/aianswer/streamAsk", {"robotId": "1", "aiQuestion": question}
    )
    assert res.status == 502, res.raw
    error = res.json()["error"]
    assert error["code"] == "upstream_error"
    # llama-server answers 400 (type exceed_context_size_error) before any event; the relay
    # passes its message on word for word, token counts included.
    expected = (
        r"^the upstream answered HTTP 400: request \(\d+ tokens\) exceeds the available "
        rf"context size \({CTX} tokens\), try increasing it$"
    )
    assert re.match(expected, error["message"]), error
    assert rp.serving()
