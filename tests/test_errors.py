"""Every failure path of the contract: HTTP errors before the stream, event: error after."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from dataclasses import replace

import pytest
from tornado.iostream import IOStream

from relay.app import watchdog_interval
from relay.config import Settings
from tests.conftest import (
    ASK,
    assert_every_block_is_an_event,
    eventually,
    fetch_stream,
    nothing_left,
)
from tests.fakeupstream import (
    answer_frames,
    by_key,
    chunk,
    hang,
    send_frames,
    status,
    stream_tokens,
)
from tests.processes import free_port


def error_of(res) -> dict:
    errors = [e for e in res.events if e.event == "error"]
    assert len(errors) == 1, res.raw
    assert b"event: error\ndata: " in res.raw  # an error frame carries no id: line
    return json.loads(errors[0].data)["error"]


# -- bad requests ---------------------------------------------------------------


@pytest.mark.gen_test
@pytest.mark.parametrize(
    ("body", "status_code", "code"),
    [
        (b"{not json", 400, "bad_json"),
        (b"[1, 2]", 400, "bad_json"),
        (json.dumps({"robotId": "1"}).encode(), 400, "bad_request"),
        (json.dumps({"robotId": "1", "aiQuestion": "  "}).encode(), 400, "bad_request"),
        (json.dumps({"robotId": "1", "aiQuestion": 5}).encode(), 400, "bad_request"),
        (json.dumps({"robotId": "9", "aiQuestion": "hi"}).encode(), 400, "unknown_robot"),
        (
            json.dumps({"aiQuestion": "hi", "aiQuestionHistory": [["only one"]]}).encode(),
            400,
            "bad_request",
        ),
        (json.dumps({"aiQuestion": "x" * (1 << 20)}).encode(), 413, "body_too_large"),
    ],
)
async def test_bad_request_bodies(relay, fake, body, status_code, code):
    for path in ("/aianswer/streamAsk", "/aianswer/sessions"):
        res = await fetch_stream(relay.url + path, body)
        assert res.status == status_code
        assert res.json()["error"]["code"] == code
    assert fake.requests == []


@pytest.mark.gen_test
async def test_too_large_body_is_refused_before_it_is_read(relay, fake):
    stream = IOStream(socket.socket())
    await stream.connect(("127.0.0.1", int(relay.url.rsplit(":", 1)[1])))
    await stream.write(
        b"POST /aianswer/streamAsk HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: 50000000\r\n\r\n{"
    )
    head = await asyncio.wait_for(stream.read_until(b"\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 413")
    stream.close()


@pytest.mark.gen_test
async def test_unknown_path_and_wrong_method_are_json(relay):
    res = await fetch_stream(relay.url + "/nope")
    assert res.status == 404 and res.json()["error"]["code"] == "not_found"
    res = await fetch_stream(relay.url + "/aianswer/streamAsk")
    assert res.status == 405 and res.json()["error"]["code"] == "method_not_allowed"


# -- upstream failures before the first event -------------------------------------


@pytest.mark.gen_test
async def test_upstream_500_is_502_with_its_message(relay, fake):
    fake.script = status(500, "model overloaded")
    res = await fetch_stream(relay.url + "/aianswer/streamAsk", ASK)
    assert res.status == 502
    err = res.json()["error"]
    assert err["code"] == "upstream_error"
    assert "500" in err["message"] and "model overloaded" in err["message"]


@pytest.mark.gen_test
async def test_upstream_redirect_is_502_not_followed(relay, fake):
    async def redirect(handler, body, key):
        handler.redirect("http://127.0.0.1:1/elsewhere", permanent=True)

    fake.script = redirect
    res = await fetch_stream(relay.url + "/aianswer/streamAsk", ASK)
    assert res.status == 502
    err = res.json()["error"]
    assert err["code"] == "upstream_error" and "301" in err["message"]


@pytest.mark.gen_test
async def test_refused_connection_is_502(make_relay):
    rs = make_relay(upstream=f"http://127.0.0.1:{free_port()}/v1")  # nothing listens there
    res = await fetch_stream(rs.url + "/aianswer/streamAsk", ASK)
    assert res.status == 502
    assert res.json()["error"]["code"] == "upstream_unavailable"


@pytest.mark.gen_test
async def test_hang_before_first_byte_is_504(make_relay, fake):
    rs = make_relay(upstream=fake.url, upstream_idle_timeout=0.5)
    fake.script = hang(10)
    res = await fetch_stream(rs.url + "/aianswer/streamAsk", ASK)
    assert res.status == 504
    assert res.json()["error"]["code"] == "upstream_timeout"
    await asyncio.wait_for(fake.disconnected.wait(), 2)


@pytest.mark.gen_test
async def test_comments_do_not_reset_the_idle_watchdog(make_relay, fake):
    rs = make_relay(upstream=fake.url, upstream_idle_timeout=0.5)
    fake.script = send_frames([b": keep-alive\n\n"] * 40, delay=0.1)
    res = await fetch_stream(rs.url + "/aianswer/streamAsk", ASK)
    assert res.status == 504


@pytest.mark.gen_test
async def test_key_answered_401_cools_down_and_next_key_is_used(make_relay, fake):
    rs = make_relay(upstream=fake.url, api_keys=("sk-bad", "sk-good"), key_strategy="round_robin")
    fake.script = by_key(
        {"sk-bad": status(401, "bad key sk-bad"), "sk-good": stream_tokens(["ok"])}
    )
    res = await fetch_stream(rs.url + "/aianswer/streamAsk", ASK)
    assert res.status == 200 and res.text() == "ok"
    assert rs.relay.upstream.keys.cooling() == (1 if fake.requests[0]["key"] == "sk-bad" else 0)
    # The cooling key is not tried first again.
    res = await fetch_stream(rs.url + "/aianswer/streamAsk", ASK)
    assert fake.requests[-1]["key"] == "sk-good" and res.text() == "ok"


@pytest.mark.gen_test
async def test_all_keys_refused_is_502_and_hides_the_key(make_relay, fake):
    rs = make_relay(upstream=fake.url, api_keys=("sk-secret-1", "sk-secret-2"))
    fake.script = status(429, "rate limited for key sk-secret-1")
    res = await fetch_stream(rs.url + "/aianswer/streamAsk", ASK)
    assert res.status == 502
    assert len(fake.requests) == 2
    assert b"sk-secret" not in res.raw


# -- failures after the stream started -----------------------------------------------


@pytest.mark.gen_test
async def test_cut_before_the_finish_is_upstream_closed(relay, fake):
    fake.script = stream_tokens(["a", "b"], finish=False)
    res = await fetch_stream(relay.url + "/aianswer/streamAsk", ASK)
    assert res.status == 200 and res.text() == "ab"
    error = error_of(res)
    assert error["code"] == "upstream_closed"
    assert error["message"] == "the upstream ended the answer before its finish"


@pytest.mark.gen_test
async def test_non_json_chunk_is_upstream_bad_chunk(relay, fake):
    fake.script = send_frames(
        answer_frames(["a"], finish=False) + [b"data: {oops\n\n"], then_hang=5
    )
    res = await fetch_stream(relay.url + "/aianswer/streamAsk", ASK)
    assert res.text() == "a"
    assert error_of(res)["code"] == "upstream_bad_chunk"
    # The relay let go of the upstream at once instead of waiting for it.
    assert fake.disconnects


@pytest.mark.gen_test
async def test_in_band_error_is_upstream_error_with_its_message(relay, fake):
    err = json.dumps({"error": {"message": "context length exceeded", "code": 400}})
    fake.script = send_frames(answer_frames(["a"], finish=False) + [f"data: {err}\n\n".encode()])
    res = await fetch_stream(relay.url + "/aianswer/streamAsk", ASK)
    e = error_of(res)
    assert e["code"] == "upstream_error" and e["message"] == "context length exceeded"


@pytest.mark.gen_test
async def test_hang_mid_stream_is_upstream_timeout_event(make_relay, fake):
    rs = make_relay(upstream=fake.url, upstream_idle_timeout=0.5)
    fake.script = send_frames(answer_frames(["a"], finish=False), then_hang=10)
    res = await fetch_stream(rs.url + "/aianswer/streamAsk", ASK)
    assert res.status == 200
    assert error_of(res)["code"] == "upstream_timeout"


@pytest.mark.gen_test
async def test_an_answer_longer_than_upstream_timeout_ends_with_upstream_timeout(make_relay, fake):
    rs = make_relay(upstream=fake.url, upstream_timeout=0.6)
    fake.script = stream_tokens([f"{i} " for i in range(100)], delay=0.05)  # 5 s, never idle
    started = time.monotonic()
    res = await fetch_stream(rs.url + "/aianswer/streamAsk", ASK)
    assert res.status == 200 and res.text().startswith("0 1 2 ")
    assert error_of(res)["code"] == "upstream_timeout"
    assert 0.6 <= time.monotonic() - started < 2
    await eventually(lambda: nothing_left(rs))


@pytest.mark.gen_test
async def test_bad_chunk_before_any_event_is_502(relay, fake):
    fake.script = send_frames([b"data: not json\n\n"])
    res = await fetch_stream(relay.url + "/aianswer/streamAsk", ASK)
    assert res.status == 502
    assert res.json()["error"]["code"] == "upstream_bad_chunk"


# -- lifetimes ------------------------------------------------------------------------


@pytest.mark.gen_test
async def test_client_that_leaves_cancels_the_upstream_within_a_second(relay, fake):
    fake.script = stream_tokens([f"{i} " for i in range(1000)], delay=0.05)
    stream = IOStream(socket.socket())
    await stream.connect(("127.0.0.1", int(relay.url.rsplit(":", 1)[1])))
    body = json.dumps(ASK).encode()
    await stream.write(
        b"POST /aianswer/streamAsk HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
    )
    await stream.read_until(b"id: 3\n")
    stream.close()
    left = time.monotonic()
    await asyncio.wait_for(fake.disconnected.wait(), 1.0)
    assert fake.disconnects[0] - left < 1.0
    await eventually(lambda: nothing_left(relay))


@pytest.mark.parametrize(
    ("overrides", "seconds"),
    [
        ({}, 1.0),  # defaults: the shortest is the 15 s heartbeat; capped at one second
        ({"heartbeat": 0.2}, 0.05),
        ({"send_timeout": 2.0}, 0.5),
        ({"upstream_idle_timeout": 0.01}, 0.02),  # never more often than every 20 ms
    ],
)
def test_watchdog_tick_is_a_quarter_of_the_shortest_timeout_within_20ms_and_1s(overrides, seconds):
    assert watchdog_interval(replace(Settings(), **overrides)) == pytest.approx(seconds)


@pytest.mark.gen_test
async def test_heartbeat_pings_on_silence(make_relay, fake):
    rs = make_relay(upstream=fake.url, heartbeat=0.2)
    frames = answer_frames(["a"], finish=False)
    fake.script = send_frames(
        [*frames, f"data: {chunk({'content': 'b'})}\n\n".encode(), b"data: [DONE]\n\n"], delay=0.7
    )
    res = await fetch_stream(rs.url + "/aianswer/streamAsk", ASK)
    assert res.text() == "ab"
    assert b": ping\n" in res.raw
    assert_every_block_is_an_event(res.raw)  # a ping is a line, never a block of its own
