"""Usage, the end of an answer without [DONE], and the role member (issue 13, points 2, 3, 5).

Every test runs a real relay in front of the fake upstream (tests/fakeupstream.py).
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import struct
import time

import pytest

from relay.robots import Robot
from relay.sessions import SessionState
from relay.upstream import USAGE_WAIT
from tests.conftest import (
    ASK,
    create_session,
    cyclic_stream_garbage,
    eventually,
    fetch_stream,
    nothing_left,
)
from tests.fakeupstream import (
    STREAM_OPTIONS_REFUSAL,
    answer_frames,
    chunk,
    refuse_stream_options,
    send_frames,
    start_stream,
    status,
    stream_tokens,
    usage_chunk,
)

USAGE = {"prompt_tokens": 18, "completion_tokens": 4, "total_tokens": 22}


def frame(text: str) -> bytes:
    return f"data: {text}\n\n".encode()


def finish_frame(reason: str = "stop", **extra) -> bytes:
    return frame(chunk({}, reason, **extra))


def message_data(res) -> list[str]:
    return [e.data for e in res.events if e.event == "message"]


def finish_doc(res) -> dict:
    """The relayed finishing chunk: the one before [DONE], carrying the business node."""
    data = message_data(res)
    assert data[-1] == "[DONE]", res.raw
    doc = json.loads(data[-2])
    assert set(doc["choices"][0]["delta"]) == {"userId", "aiId", "occurTime"}, doc
    return doc


async def metrics_text(rs) -> str:
    return (await fetch_stream(rs.url + "/metrics")).raw.decode()


# -- asking for usage ----------------------------------------------------------------------


@pytest.mark.gen_test
async def test_the_request_asks_for_usage_by_default(relay, fake):
    await fetch_stream(relay.url + "/aianswer/streamAsk", ASK)
    assert fake.requests[0]["body"]["stream_options"] == {"include_usage": True}


@pytest.mark.gen_test
@pytest.mark.parametrize(
    ("flag", "robot", "asked"),
    [(True, None, True), (False, None, False), (True, False, False), (False, True, True)],
)
async def test_include_usage_flag_and_the_robot_setting_which_wins(
    make_relay, fake, flag, robot, asked
):
    robots = (Robot("1", "One", include_usage=robot),)
    rs = make_relay(upstream=fake.url, include_usage=flag, robots=robots)
    res = await fetch_stream(rs.url + "/aianswer/streamAsk", ASK)
    assert res.text() == "Hello, world"
    assert ("stream_options" in fake.requests[0]["body"]) is asked


@pytest.mark.gen_test
async def test_a_400_naming_stream_options_is_retried_once_without_them_and_remembered(
    make_relay, fake
):
    rs = make_relay(upstream=fake.url, api_keys=("sk-one", "sk-two"), key_strategy="round_robin")
    fake.script = refuse_stream_options(stream_tokens(["ok"]))
    res = await fetch_stream(rs.url + "/aianswer/streamAsk", ASK)
    assert res.status == 200 and res.text() == "ok"
    first, retry = fake.requests
    assert first["body"]["stream_options"] == {"include_usage": True}
    assert "stream_options" not in retry["body"]
    assert retry["body"]["messages"] == first["body"]["messages"]
    assert retry["key"] == first["key"]  # the same key: it was not refused
    assert rs.relay.upstream.refuses_stream_options
    # Later calls to that server no longer ask: one request each.
    res = await fetch_stream(rs.url + "/aianswer/streamAsk", ASK)
    assert res.text() == "ok" and len(fake.requests) == 3
    assert "stream_options" not in fake.requests[2]["body"]
    assert 'relay_upstream_responses_total{status="400"} 1.0' in await metrics_text(rs)


@pytest.mark.gen_test
async def test_a_server_that_names_stream_options_again_is_not_retried_twice(relay, fake):
    fake.script = status(400, STREAM_OPTIONS_REFUSAL)  # whatever the request holds
    res = await fetch_stream(relay.url + "/aianswer/streamAsk", ASK)
    assert res.status == 502 and res.json()["error"]["code"] == "upstream_error"
    assert "stream_options" in res.json()["error"]["message"]
    assert len(fake.requests) == 2
    assert "stream_options" not in fake.requests[1]["body"]


@pytest.mark.gen_test
@pytest.mark.parametrize(
    "message",
    [
        "This model's maximum context length is 64 tokens. However, you requested 80 tokens.",
        # A message that quotes something else is no refusal of stream_options.
        "the request exceeds the available context size, try increasing it",
    ],
)
async def test_a_400_for_anything_else_is_never_retried(relay, fake, message):
    fake.script = status(400, message)
    res = await fetch_stream(relay.url + "/aianswer/streamAsk", ASK)
    assert res.status == 502
    assert res.json()["error"]["message"] == f"the upstream answered HTTP 400: {message}"
    assert len(fake.requests) == 1
    assert not relay.relay.upstream.refuses_stream_options
    fake.script = stream_tokens(["ok"])
    await fetch_stream(relay.url + "/aianswer/streamAsk", ASK)
    assert "stream_options" in fake.requests[1]["body"]


@pytest.mark.gen_test
async def test_a_400_whose_body_only_echoes_stream_options_elsewhere_is_not_retried(relay, fake):
    async def script(handler, body, key):
        handler.set_status(400)
        handler.set_header("Content-Type", "application/json")
        handler.write({"error": {"message": "prompt too long"}, "request": body})

    fake.script = script
    res = await fetch_stream(relay.url + "/aianswer/streamAsk", ASK)
    assert res.status == 502 and len(fake.requests) == 1


@pytest.mark.gen_test
@pytest.mark.parametrize(
    "body",
    [
        b'{"detail": [{"loc": ["body", "stream_options"], "msg": "extra fields not permitted"}]}',
        b'{"object": "error", "message": "stream_options is not supported", "code": 400}',
        b"Bad Request: unknown field stream_options",
    ],
)
async def test_refusals_of_stream_options_in_other_servers_shapes_are_recognised(relay, fake, body):
    async def script(handler, req, key):
        if "stream_options" not in req:
            return await stream_tokens(["ok"])(handler, req, key)
        handler.set_status(400)
        handler.write(body)

    fake.script = script
    res = await fetch_stream(relay.url + "/aianswer/streamAsk", ASK)
    assert res.text() == "ok" and len(fake.requests) == 2


# -- usage on the finishing chunk ----------------------------------------------------------


@pytest.mark.gen_test
@pytest.mark.parametrize("style", ["openai", "litellm"])
async def test_a_usage_chunk_is_merged_into_the_finish_chunk_never_its_own(relay, fake, style):
    usage = {**USAGE, "cost": 0.0002913}
    fake.script = send_frames(
        [
            *answer_frames(["a", "b"], finish=False),
            finish_frame(),
            usage_chunk(usage, style),
            b"data: [DONE]\n\n",
        ]
    )
    res = await fetch_stream(relay.url + "/aianswer/streamAsk", ASK)
    assert res.text() == "ab"
    assert finish_doc(res)["usage"] == usage
    data = message_data(res)
    assert len(data) == 4  # a, b, the finishing chunk, [DONE]
    for text in data[:-1]:
        assert json.loads(text)["choices"], text  # every chunk has a choices[0]


@pytest.mark.gen_test
async def test_usage_sent_before_the_finish_chunk_goes_on_it(relay, fake):
    fake.script = send_frames(
        [
            *answer_frames(["a"], finish=False),
            usage_chunk(USAGE),
            finish_frame(),
            b"data: [DONE]\n\n",
        ]
    )
    res = await fetch_stream(relay.url + "/aianswer/streamAsk", ASK)
    assert finish_doc(res)["usage"] == USAGE and len(message_data(res)) == 3


@pytest.mark.gen_test
async def test_usage_split_from_the_finish_chunk_across_reads_still_joins_it(relay, fake):
    fake.script = send_frames(
        [
            *answer_frames(["a"], finish=False),
            finish_frame(),
            usage_chunk(USAGE),
            b"data: [DONE]\n\n",
        ],
        delay=0.2,
    )
    res = await fetch_stream(relay.url + "/aianswer/streamAsk", ASK)
    assert finish_doc(res)["usage"] == USAGE


@pytest.mark.gen_test
async def test_a_chunk_after_the_finish_chunk_follows_it_in_order(relay, fake):
    fake.script = send_frames(
        [finish_frame(), frame(chunk({"content": "late"})), b"data: [DONE]\n\n"], delay=0.05
    )
    res = await fetch_stream(relay.url + "/aianswer/streamAsk", ASK)
    data = message_data(res)
    assert json.loads(data[0])["choices"][0]["finish_reason"] == "stop"
    assert data[1:] == [chunk({"content": "late"}), "[DONE]"]


@pytest.mark.gen_test
async def test_finish_chunk_with_no_usage_or_done_completes_after_the_usage_wait(relay, fake):
    fake.script = send_frames([*answer_frames(["a"], finish=False), finish_frame()], then_hang=10)
    started = time.monotonic()
    res = await fetch_stream(relay.url + "/aianswer/streamAsk", ASK)
    elapsed = time.monotonic() - started
    assert USAGE_WAIT - 0.1 <= elapsed < USAGE_WAIT + 1.5, elapsed
    assert res.text() == "a" and "usage" not in finish_doc(res)
    assert not [e for e in res.events if e.event == "error"]
    # The upstream connection is let go (after the release grace), not kept for the hang.
    await asyncio.wait_for(fake.disconnected.wait(), 3)
    await eventually(lambda: nothing_left(relay))


@pytest.mark.gen_test
async def test_usage_then_silence_sends_the_finish_chunk_at_once_and_done_after_the_wait(
    relay, fake
):
    fake.script = send_frames([finish_frame(), usage_chunk(USAGE)], then_hang=10)
    uid = (await create_session(relay))["uid"]
    session = await relay.relay.store.get(uid)
    await eventually(lambda: session.last_seq == 1, timeout=USAGE_WAIT - 0.5)
    assert session.running  # the finish chunk (with usage) is out; [DONE] waits
    res = await fetch_stream(f"{relay.url}/aianswer/stream/{uid}")
    assert finish_doc(res)["usage"] == USAGE
    assert session.state == SessionState.DONE


# -- the end of the body after the finish chunk ----------------------------------------------


def finish_then(end: str):
    """An answer with a finish chunk and no [DONE], then ``end``: the body ends cleanly, the
    connection is reset, or the upstream stays silent."""

    async def script(handler, body, key):
        start_stream(handler)
        for f in [*answer_frames(["a", "b"], finish=False), finish_frame("length", usage=USAGE)]:
            await handler.send(f)
        if end == "clean":
            return
        if end == "silent":
            await asyncio.sleep(10)
            return
        await asyncio.sleep(0.2)  # let the relay read it all: a reset drops unread data
        sock = handler.request.connection.stream.socket
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        handler.request.connection.stream.close()

    return script


@pytest.mark.gen_test(timeout=20)
@pytest.mark.parametrize("end", ["clean", "reset", "silent"])
async def test_any_end_after_the_finish_chunk_completes_the_answer(make_relay, fake, clean_gc, end):
    # The idle timeout, shorter than the usage wait, is what ends the silent one.
    rs = make_relay(upstream=fake.url, upstream_idle_timeout=0.5)
    fake.script = finish_then(end)
    uid = (await create_session(rs))["uid"]
    session = await rs.relay.store.get(uid)
    started = time.monotonic()
    res = await fetch_stream(f"{rs.url}/aianswer/stream/{uid}")
    assert time.monotonic() - started < USAGE_WAIT  # not the usage wait: the end itself
    assert res.text() == "ab"
    doc = finish_doc(res)
    assert doc["choices"][0]["finish_reason"] == "length" and doc["usage"] == USAGE
    assert not [e for e in res.events if e.event == "error"]
    assert session.state == SessionState.DONE and session.error is None
    metrics = await metrics_text(rs)
    assert "relay_upstream_errors_total{" not in metrics, metrics
    assert 'relay_streams_ended_total{reason="done"} 1.0' in metrics
    await rs.relay.store.remove(uid)
    await eventually(lambda: nothing_left(rs))
    assert cyclic_stream_garbage() == []


@pytest.mark.gen_test
async def test_one_shot_answer_ending_with_the_finish_chunk_ends_with_done(relay, fake):
    fake.script = send_frames([*answer_frames(["x"], finish=False), finish_frame()])
    res = await fetch_stream(relay.url + "/aianswer/streamAsk", ASK)
    assert res.text() == "x" and finish_doc(res) and message_data(res)[-1] == "[DONE]"


@pytest.mark.gen_test
async def test_the_usage_wait_leaves_no_cycles(relay, fake, clean_gc):
    fake.script = send_frames([finish_frame()], then_hang=10)
    res = await fetch_stream(relay.url + "/aianswer/streamAsk", ASK)
    assert message_data(res)[-1] == "[DONE]"
    await eventually(lambda: nothing_left(relay), timeout=3)
    assert cyclic_stream_garbage() == []


@pytest.mark.gen_test
async def test_an_error_after_the_finish_chunk_is_still_an_error(relay, fake):
    err = json.dumps({"error": {"message": "the model crashed"}})
    fake.script = send_frames([frame(chunk({"content": "a"})), finish_frame(), frame(err)])
    res = await fetch_stream(relay.url + "/aianswer/streamAsk", ASK)
    assert res.status == 200 and res.text() == "a"  # the held finish chunk is not sent
    errors = [json.loads(e.data)["error"] for e in res.events if e.event == "error"]
    assert [e["code"] for e in errors] == ["upstream_error"]


@pytest.mark.gen_test
async def test_a_client_leaving_while_the_finish_chunk_is_held_cancels_the_upstream(relay, fake):
    fake.script = send_frames([*answer_frames(["a"], finish=False), finish_frame()], then_hang=10)
    uid = (await create_session(relay))["uid"]
    session = await relay.relay.store.get(uid)
    await eventually(lambda: session.last_seq == 1)
    res = await fetch_stream(f"{relay.url}/aianswer/sessions/{uid}", method="DELETE")
    assert res.status == 204
    await asyncio.wait_for(fake.disconnected.wait(), 1)
    await eventually(lambda: nothing_left(relay))
    assert session.error.code == "cancelled"


# -- token counts ------------------------------------------------------------------------


@pytest.mark.gen_test
async def test_tokens_are_counted_per_robot_and_user_in_metrics_and_the_access_line(
    make_relay, fake, caplog
):
    caplog.set_level(logging.INFO)
    rs = make_relay(upstream=fake.url, auth_tokens={"tok-a": "alice", "tok-b": "bob"})
    fake.script = send_frames(
        [
            *answer_frames(["a"], finish=False),
            finish_frame(),
            usage_chunk(USAGE),
            b"data: [DONE]\n\n",
        ]
    )
    for token in ("tok-a", "tok-a", "tok-b"):
        auth = {"Authorization": f"Bearer {token}"}
        res = await fetch_stream(rs.url + "/aianswer/streamAsk", ASK, headers=auth)
        assert finish_doc(res)["usage"] == USAGE
    fake.script = stream_tokens(["no usage"])
    await fetch_stream(
        rs.url + "/aianswer/streamAsk", ASK, headers={"Authorization": "Bearer tok-b"}
    )
    metrics = await metrics_text(rs)
    for line in (
        'relay_prompt_tokens_total{robot="1",user="alice"} 36.0',
        'relay_completion_tokens_total{robot="1",user="alice"} 8.0',
        'relay_prompt_tokens_total{robot="1",user="bob"} 18.0',
        'relay_completion_tokens_total{robot="1",user="bob"} 4.0',
    ):
        assert line in metrics, line
    lines = [r.getMessage() for r in caplog.records if r.name == "relay.access"]
    assert len(lines) == 4
    for line in lines[:3]:
        assert "prompt_tokens=18 completion_tokens=4" in line, line
    assert "user=bob" in lines[3] and "prompt_tokens=- completion_tokens=-" in lines[3]


@pytest.mark.gen_test
async def test_anonymous_users_are_counted_as_anonymous(relay, fake):
    fake.script = send_frames([finish_frame(usage=USAGE), b"data: [DONE]\n\n"])
    await fetch_stream(relay.url + "/aianswer/streamAsk", ASK)
    metrics = await metrics_text(relay)
    assert 'relay_prompt_tokens_total{robot="1",user="anonymous"} 18.0' in metrics


# -- the role member --------------------------------------------------------------------


@pytest.mark.gen_test
async def test_role_on_every_chunk_is_removed_and_every_other_byte_kept(relay, fake):
    # Ollama sends the role on every chunk; LiteLLM on the first, with content.
    texts = [
        '{"id":"c","choices":[{"index":0,"delta":{"role":"assistant","content":"你"}}]}',
        '{"id": "c", "choices": [{"index": 0, "delta": {"content": " 好", "role": "assistant"}}]}',
        '{"id":"c","choices":[{"delta":{ "content":"\\"role\\": \\"x\\"" , "role" : null },'
        '"index":0}]}',
    ]
    fake.script = send_frames([*map(frame, texts), finish_frame(), b"data: [DONE]\n\n"])
    res = await fetch_stream(relay.url + "/aianswer/streamAsk", ASK)
    assert message_data(res)[:3] == [
        '{"id":"c","choices":[{"index":0,"delta":{"content":"你"}}]}',
        '{"id": "c", "choices": [{"index": 0, "delta": {"content": " 好"}}]}',
        '{"id":"c","choices":[{"delta":{ "content":"\\"role\\": \\"x\\"" },"index":0}]}',
    ]
    assert res.text() == '你 好"role": "x"'


@pytest.mark.gen_test
async def test_the_content_of_a_finish_chunk_with_a_role_goes_without_the_role(relay, fake):
    fake.script = send_frames(
        [frame(chunk({"role": "assistant", "content": "all"}, "stop")), b"data: [DONE]\n\n"]
    )
    res = await fetch_stream(relay.url + "/aianswer/streamAsk", ASK)
    head = json.loads(message_data(res)[0])["choices"][0]
    assert head["delta"] == {"content": "all"} and head["finish_reason"] is None
