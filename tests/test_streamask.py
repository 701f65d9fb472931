"""One-shot streaming (POST /aianswer/streamAsk) against a real fake upstream."""

from __future__ import annotations

import asyncio
import json
import re
import time

import pytest

from relay import demo
from relay.http1 import ResponseParser
from relay.sse import ServerSentEvent, SSEParser
from tests.conftest import (
    ASK,
    StreamResult,
    assert_every_block_is_an_event,
    eventually,
    fetch_stream,
)
from tests.fakeupstream import answer_frames, chunk, send_frames, stream_tokens
from tests.streams import raw_connection

TOKENS = ["尊敬", "的", "用户", "，", "\n\n", " ", "Hello", " world", "！", "\n"]


@pytest.mark.gen_test(timeout=30)
async def test_demo_answer_streams_complete_and_exact(make_relay):
    rs = make_relay()
    res = await fetch_stream(rs.url + "/aianswer/streamAsk", ASK)
    assert res.status == 200
    assert res.text() == demo.answer_for(ASK["aiQuestion"])
    assert res.data[-1] == "[DONE]"


@pytest.mark.gen_test
async def test_response_headers_and_retry_first(relay):
    res = await fetch_stream(relay.url + "/aianswer/streamAsk", ASK)
    assert res.headers["content-type"] == "text/event-stream; charset=utf-8"
    assert res.headers["cache-control"] == "no-cache"
    assert res.headers["x-accel-buffering"] == "no"
    assert res.raw.startswith(b"retry: 3000\ndata: ")  # retry opens the first event
    assert_every_block_is_an_event(res.raw)
    assert res.retry == 3000


@pytest.mark.gen_test
async def test_happy_path_text_is_exact_with_whitespace_tokens(relay, fake):
    fake.script = stream_tokens(TOKENS)
    res = await fetch_stream(relay.url + "/aianswer/streamAsk", ASK)
    assert res.status == 200
    assert res.text() == "".join(TOKENS)
    # The upstream's own JSON text is relayed byte for byte.
    assert res.data[: len(TOKENS)] == [chunk({"content": t}) for t in TOKENS]
    assert [e.id for e in res.events] == [str(i) for i in range(1, len(TOKENS) + 3)]


@pytest.mark.gen_test
async def test_role_only_and_empty_chunks_are_dropped(relay, fake):
    frames = [
        f"data: {chunk({'role': 'assistant'})}\n\n".encode(),
        f"data: {chunk({})}\n\n".encode(),
        f"data: {chunk({'content': ''})}\n\n".encode(),
        f"data: {chunk({'content': 'x'})}\n\n".encode(),
        f"data: {chunk({}, 'stop')}\n\n".encode(),
        b"data: [DONE]\n\n",
    ]
    fake.script = send_frames(frames)
    res = await fetch_stream(relay.url + "/aianswer/streamAsk", ASK)
    assert len(res.data) == 3
    assert res.data[0] == chunk({"content": "x"})


@pytest.mark.gen_test
async def test_finish_chunk_carries_business_node_and_keeps_usage(make_relay, fake):
    rs = make_relay(upstream=fake.url, auth_tokens={"tok-a": "alice"})
    usage = {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    frames = answer_frames(["hi"], finish=False) + [
        f"data: {chunk({}, 'stop', usage=usage)}\n\n".encode(),
        b"data: [DONE]\n\n",
    ]
    fake.script = send_frames(frames)
    res = await fetch_stream(
        rs.url + "/aianswer/streamAsk", ASK, headers={"Authorization": "Bearer tok-a"}
    )
    last = json.loads(res.data[-2])
    node = last["choices"][0]["delta"]
    assert set(node) == {"userId", "aiId", "occurTime"}
    assert node["userId"] == "alice"
    assert len(node["aiId"]) == 32
    assert time.strptime(node["occurTime"], "%Y-%m-%d %H:%M:%S")
    assert last["choices"][0]["finish_reason"] == "stop"
    assert last["usage"] == usage


@pytest.mark.gen_test
async def test_finish_chunk_with_content_keeps_the_content(relay, fake):
    frames = [
        f"data: {chunk({'content': 'last words'}, 'stop')}\n\n".encode(),
        b"data: [DONE]\n\n",
    ]
    fake.script = send_frames(frames)
    res = await fetch_stream(relay.url + "/aianswer/streamAsk", ASK)
    assert res.text() == "last words"
    assert json.loads(res.data[0])["choices"][0]["finish_reason"] is None
    assert json.loads(res.data[1])["choices"][0]["delta"]["userId"] == "anonymous"


@pytest.mark.gen_test
async def test_reasoning_and_tool_call_chunks_are_relayed(relay, fake):
    tool = [{"index": 0, "id": "call_1", "function": {"name": "f", "arguments": "{}"}}]
    frames = [
        f"data: {chunk({'reasoning_content': '想一想'})}\n\n".encode(),
        f"data: {chunk({'tool_calls': tool})}\n\n".encode(),
        f"data: {chunk({}, 'tool_calls')}\n\n".encode(),
        b"data: [DONE]\n\n",
    ]
    fake.script = send_frames(frames)
    res = await fetch_stream(relay.url + "/aianswer/streamAsk", ASK)
    assert res.data[0] == chunk({"reasoning_content": "想一想"})
    assert res.data[1] == chunk({"tool_calls": tool})


@pytest.mark.gen_test
async def test_one_byte_at_a_time_upstream_with_crlf_comments_and_split_utf8(relay, fake):
    body = b"".join(answer_frames(TOKENS)).replace(b"\n", b"\r\n")
    body = b": keep-alive\r\n\r\n" + body
    fake.script = send_frames([bytes([b]) for b in body])
    res = await fetch_stream(relay.url + "/aianswer/streamAsk", ASK)
    assert res.text() == "".join(TOKENS)
    assert b"keep-alive" not in res.raw


@pytest.mark.gen_test
async def test_upstream_request_is_built_from_robot_history_and_question(make_relay, fake):
    rs = make_relay(upstream=fake.url, api_keys=("sk-one",), model="m-default")
    ask = {**ASK, "aiQuestionHistory": [["q1", "a1"]], "extra": "ignored"}
    await fetch_stream(rs.url + "/aianswer/streamAsk", ask)
    sent = fake.requests[0]
    assert sent["key"] == "sk-one"
    assert sent["body"]["model"] == "m-default"
    assert sent["body"]["stream"] is True
    assert sent["body"]["messages"] == [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "q1"},
        {"role": "assistant", "content": "a1"},
        {"role": "user", "content": "你好"},
    ]


@pytest.mark.gen_test(timeout=20)
async def test_fifty_concurrent_streams_are_not_serialised(relay, fake):
    # Each upstream answer waits until all fifty are open at once: a relay that
    # queued them (AsyncHTTPClient's default max_clients is 10) would deadlock.
    all_open = asyncio.Event()

    async def script(handler, body, key):
        if fake.active >= 50:
            all_open.set()
        await asyncio.wait_for(all_open.wait(), 10)
        await stream_tokens(["ok"])(handler, body, key)

    fake.script = script
    results = await asyncio.gather(
        *(fetch_stream(relay.url + "/aianswer/streamAsk", ASK) for _ in range(50))
    )
    assert [r.text() for r in results] == ["ok"] * 50
    assert fake.max_active == 50


@pytest.mark.slow
@pytest.mark.gen_test(timeout=60)
async def test_stream_longer_than_twenty_seconds_is_not_cut(relay, fake):
    fake.script = stream_tokens([f"t{i} " for i in range(23)], delay=1.0)
    res = await fetch_stream(relay.url + "/aianswer/streamAsk", ASK, timeout=60)
    assert res.text() == "".join(f"t{i} " for i in range(23))
    assert res.data[-1] == "[DONE]"


# -- the write path: frames go straight to the socket until it is full ------------------


def post(version: str) -> bytes:
    body = json.dumps(ASK).encode()
    return (
        b"POST /aianswer/streamAsk %s\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (version.encode(), len(body), body)
    )


def answer_text(events: list[ServerSentEvent]) -> str:
    return StreamResult(200, {}, events, b"").text()


@pytest.mark.gen_test(timeout=30)
async def test_slow_reader_gets_every_frame_in_order_across_socket_full_and_drain(relay, fake):
    # Far more than the socket buffers hold: sends stop short, the rest queues on
    # the IOStream, the pump waits for it to drain, then sends directly again.
    tokens = [f"{i:05d}片段" + "x" * 1500 for i in range(5000)]  # 7.6 MB: past any send buffer
    fake.script = stream_tokens(tokens)
    stream = await raw_connection(relay.url, post("HTTP/1.1"), rcvbuf=4096)
    # Read nothing until the socket is full and the relay has bytes queued.
    await eventually(
        lambda: any(s._writer and s._writer.blocked for s in relay.relay.streams), timeout=10
    )
    response, parser, events = ResponseParser(), SSEParser(), []
    while not response.done:
        events += parser.feed(response.feed(await stream.read_bytes(65536, partial=True)))
    stream.close()
    assert answer_text(events) == "".join(tokens)
    assert [int(e.id) for e in events] == list(range(1, len(tokens) + 3))


@pytest.mark.gen_test
async def test_http10_client_gets_an_unchunked_stream_ended_by_close(relay, fake):
    fake.script = stream_tokens(["你", "好", "\n"])
    stream = await raw_connection(relay.url, post("HTTP/1.0"))
    raw = await stream.read_until_close()
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ") and b"Transfer-Encoding" not in head
    assert body.startswith(b"retry: 3000\n")
    assert answer_text(SSEParser().feed(body)) == "你好\n"


@pytest.mark.gen_test
async def test_the_next_answer_reuses_the_upstream_connection(relay, fake):
    for _ in range(3):
        res = await fetch_stream(relay.url + "/aianswer/streamAsk", ASK)
        assert res.text() == "Hello, world"
    assert len({r["peer"] for r in fake.requests}) == 1
    assert "Connection" not in fake.requests[0]["headers"]
    assert relay.relay.upstream.client.pool.idle_count == 1


@pytest.mark.gen_test
async def test_upstream_keepalive_zero_opens_a_connection_per_answer(make_relay, fake):
    rs = make_relay(upstream=fake.url, upstream_keepalive=0)
    for _ in range(2):
        res = await fetch_stream(rs.url + "/aianswer/streamAsk", ASK)
        assert res.text() == "Hello, world"
    assert len({r["peer"] for r in fake.requests}) == 2
    assert fake.requests[0]["headers"]["Connection"] == "close"


@pytest.mark.gen_test
async def test_a_finished_stream_sends_one_terminating_chunk_and_the_connection_stays_usable(
    relay, fake
):
    # Regression: an empty end frame once went out as a chunk of its own, "0\r\n\r\n",
    # before Tornado's: clients saw the end early and 5 stray bytes broke keep-alive.
    stream = await raw_connection(relay.url, post("HTTP/1.1"))
    await stream.read_until(b"data: [DONE]\n")
    # The event's id and end, its chunk's end, the last chunk; then the next answer's head.
    assert re.fullmatch(rb"id: \d+\n\n\r\n0\r\n\r\n", await stream.read_until(b"0\r\n\r\n"))
    await stream.write(post("HTTP/1.1"))
    assert (await stream.read_until(b"\r\n\r\n")).startswith(b"HTTP/1.1 200 ")
    stream.close()
