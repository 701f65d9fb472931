"""The two-step flow: POST /aianswer/sessions, GET /aianswer/stream/<uid>, DELETE, TTL."""

from __future__ import annotations

import asyncio
import json
import socket

import pytest
from tornado.iostream import IOStream
from tornado.simple_httpclient import HTTPStreamClosedError

from relay.memory_store import MemoryStore
from relay.sessions import Session, SessionLimits
from tests.conftest import ASK, create_session, eventually, fetch_stream
from tests.fakeupstream import answer_frames, hang, stream_tokens

TOKENS = [f"词{i} " for i in range(30)]


async def read_until_id(rs, stream_url: str, last_id: int, headers: bytes = b"") -> bytes:
    """Open the stream on a raw socket, read through event ``last_id``, then drop."""
    stream = IOStream(socket.socket())
    await stream.connect(("127.0.0.1", int(rs.url.rsplit(":", 1)[1])))
    await stream.write(b"GET %s HTTP/1.1\r\nHost: x\r\n%s\r\n" % (stream_url.encode(), headers))
    data = await stream.read_until(b"\nid: %d\n\n" % last_id)  # the id line ends an event
    stream.close()
    return data


@pytest.mark.gen_test
async def test_create_then_stream_gives_the_whole_answer(relay, fake):
    fake.script = stream_tokens(TOKENS)
    created = await create_session(relay)
    assert len(created["uid"]) == 32 and int(created["uid"], 16) >= 0
    assert created["streamUrl"] == f"/aianswer/stream/{created['uid']}"
    res = await fetch_stream(relay.url + created["streamUrl"])
    assert res.status == 200
    assert res.text() == "".join(TOKENS)
    assert res.data[-1] == "[DONE]"


@pytest.mark.gen_test
async def test_resume_with_last_event_id_has_no_gap_and_no_duplicate(relay, fake):
    fake.script = stream_tokens(TOKENS, delay=0.01)
    created = await create_session(relay)
    first = await read_until_id(relay, created["streamUrl"], 7)
    assert b"id: 8\n" not in first
    for how in ("header", "query"):
        if how == "header":
            res = await fetch_stream(
                relay.url + created["streamUrl"], headers={"Last-Event-ID": "7"}
            )
        else:
            res = await fetch_stream(relay.url + created["streamUrl"] + "?lastEventId=7")
        ids = [int(e.id) for e in res.events]
        assert ids[0] == 8 and ids == list(range(8, ids[-1] + 1))
        assert res.text() == "".join(TOKENS[7:])


@pytest.mark.gen_test
async def test_last_event_id_zero_replays_everything(relay, fake):
    fake.script = stream_tokens(TOKENS)
    created = await create_session(relay)
    await fetch_stream(relay.url + created["streamUrl"])
    res = await fetch_stream(relay.url + created["streamUrl"], headers={"Last-Event-ID": "0"})
    assert res.text() == "".join(TOKENS)


@pytest.mark.gen_test
async def test_reconnect_to_finished_session_with_nothing_left_is_204(relay, fake):
    fake.script = stream_tokens(["a"])
    created = await create_session(relay)
    res = await fetch_stream(relay.url + created["streamUrl"])
    last = res.events[-1].id
    res = await fetch_stream(relay.url + created["streamUrl"], headers={"Last-Event-ID": last})
    assert res.status == 204


@pytest.mark.gen_test
@pytest.mark.parametrize("last_id", ["99", "-1", "abc", "1.5"])
async def test_unknown_last_event_id_is_an_error_event(relay, fake, last_id):
    fake.script = stream_tokens(["a"])
    created = await create_session(relay)
    res = await fetch_stream(relay.url + created["streamUrl"], headers={"Last-Event-ID": last_id})
    assert res.status == 200
    assert [e.event for e in res.events] == ["error"]
    assert json.loads(res.events[0].data)["error"]["code"] == "bad_last_event_id"


@pytest.mark.gen_test
async def test_last_event_id_older_than_kept_events_is_an_error_not_a_gap(make_relay, fake):
    rs = make_relay(upstream=fake.url)
    rs.relay.store.limits = SessionLimits(max_events=5)
    fake.script = stream_tokens(TOKENS)
    created = await create_session(rs)
    await fetch_stream(rs.url + created["streamUrl"])
    res = await fetch_stream(rs.url + created["streamUrl"], headers={"Last-Event-ID": "2"})
    assert json.loads(res.events[0].data)["error"]["code"] == "bad_last_event_id"
    res = await fetch_stream(rs.url + created["streamUrl"], headers={"Last-Event-ID": "28"})
    assert [int(e.id) for e in res.events] == [29, 30, 31, 32]


@pytest.mark.gen_test
async def test_first_attach_to_a_trimmed_session_replays_from_the_oldest_kept_event(
    make_relay, fake
):
    rs = make_relay(upstream=fake.url)
    rs.relay.store.limits = SessionLimits(max_events=5)
    fake.script = stream_tokens(TOKENS)
    created = await create_session(rs)
    session = await rs.relay.store.get(created["uid"])
    await eventually(lambda: not session.running)
    assert session.first_seq == 28  # events 1-27 were dropped
    for url in (created["streamUrl"], created["streamUrl"] + "?lastEventId="):
        res = await fetch_stream(rs.url + url)
        assert res.status == 200
        assert [e.id for e in res.events] == ["28", "29", "30", "31", "32"]
        assert res.text() == "".join(TOKENS[27:])
    # An explicit 0 asks for event 1, which is gone: an error, never a silent gap.
    res = await fetch_stream(rs.url + created["streamUrl"], headers={"Last-Event-ID": "0"})
    assert json.loads(res.events[0].data)["error"]["code"] == "bad_last_event_id"


@pytest.mark.gen_test
async def test_unknown_uid_is_404(relay):
    res = await fetch_stream(relay.url + "/aianswer/stream/" + "0" * 32)
    assert res.status == 404 and res.json()["error"]["code"] == "not_found"
    res = await fetch_stream(relay.url + "/aianswer/sessions/" + "0" * 32, method="DELETE")
    assert res.status == 404


@pytest.mark.gen_test
async def test_upstream_runs_to_its_end_with_no_client_attached(relay, fake):
    fake.script = stream_tokens(TOKENS, delay=0.005)
    created = await create_session(relay)
    session = await relay.relay.store.get(created["uid"])
    for _ in range(200):
        if not session.running:
            break
        await asyncio.sleep(0.02)
    assert session.state == "done"
    res = await fetch_stream(relay.url + created["streamUrl"])
    assert res.text() == "".join(TOKENS)


@pytest.mark.gen_test
async def test_stream_attached_before_the_first_event_gets_headers_and_retry_at_once(relay, fake):
    # Regression: the retry frame sat in the write buffer until the first event
    # or heartbeat, so an EventSource did not open for up to 15 s.
    fake.script = hang(30)
    created = await create_session(relay)
    stream = IOStream(socket.socket())
    await stream.connect(("127.0.0.1", int(relay.url.rsplit(":", 1)[1])))
    await stream.write(b"GET %s HTTP/1.1\r\nHost: x\r\n\r\n" % created["streamUrl"].encode())
    head = await asyncio.wait_for(stream.read_until(b"retry: 3000\n"), 2)
    assert head.startswith(b"HTTP/1.1 200")
    stream.close()


@pytest.mark.gen_test
async def test_delete_cancels_upstream_and_ends_open_streams(relay, fake):
    fake.script = hang(30)
    created = await create_session(relay)
    reader = asyncio.ensure_future(fetch_stream(relay.url + created["streamUrl"]))
    await eventually(lambda: relay.relay.streams)
    res = await fetch_stream(relay.url + f"/aianswer/sessions/{created['uid']}", method="DELETE")
    assert res.status == 204
    await asyncio.wait_for(fake.disconnected.wait(), 1)
    streamed = await asyncio.wait_for(reader, 2)
    assert json.loads(streamed.events[-1].data)["error"]["code"] == "cancelled"
    res = await fetch_stream(relay.url + created["streamUrl"])
    assert res.status == 404


@pytest.mark.gen_test
async def test_session_is_gone_after_its_ttl(make_relay, fake):
    rs = make_relay(upstream=fake.url, session_ttl=0.3, prune_interval=0.1)
    fake.script = stream_tokens(["a"])
    created = await create_session(rs)
    await fetch_stream(rs.url + created["streamUrl"])
    assert len(rs.relay.store) == 1
    await asyncio.sleep(0.6)
    assert len(rs.relay.store) == 0  # removed by the prune callback, not by a lookup
    res = await fetch_stream(rs.url + created["streamUrl"])
    assert res.status == 404


@pytest.mark.gen_test
async def test_foreign_token_gets_404_on_stream_and_delete(make_relay, fake):
    rs = make_relay(upstream=fake.url, auth_tokens={"tok-a": "alice", "tok-b": "bob"})
    fake.script = stream_tokens(["a"])
    created = await create_session(rs, headers={"Authorization": "Bearer tok-a"})
    bob = {"Authorization": "Bearer tok-b"}
    assert (await fetch_stream(rs.url + created["streamUrl"], headers=bob)).status == 404
    url = rs.url + f"/aianswer/sessions/{created['uid']}"
    assert (await fetch_stream(url, method="DELETE", headers=bob)).status == 404
    # No header: the uid is the capability (EventSource cannot send one).
    assert (await fetch_stream(rs.url + created["streamUrl"])).status == 200
    alice = {"Authorization": "Bearer tok-a"}
    assert (await fetch_stream(url, method="DELETE", headers=alice)).status == 204


@pytest.mark.gen_test
async def test_missing_or_wrong_token_is_401(make_relay, fake):
    rs = make_relay(upstream=fake.url, auth_tokens={"tok-a": "alice"})
    for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": "Basic tok-a"}):
        for path in ("/aianswer/streamAsk", "/aianswer/sessions"):
            res = await fetch_stream(rs.url + path, ASK, headers=headers)
            assert res.status == 401 and res.json()["error"]["code"] == "unauthorized"
    assert fake.requests == []


# -- the session object itself ---------------------------------------------------------


class Reader:
    def __init__(self) -> None:
        self.woken = 0
        self.dropped = False

    def wake(self) -> None:
        self.woken += 1

    def drop(self) -> None:
        self.dropped = True


class BrokenReader(Reader):
    def wake(self) -> None:
        raise RuntimeError("a bug in one stream")


def test_one_reader_failing_in_wake_does_not_fail_the_others(caplog):
    # Regression: the exception ran up into the upstream read and failed the call,
    # and so the answer, for every reader of the session.
    s = Session("u" * 32, "alice", "1", replayable=True, limits=SessionLimits())
    good, broken, later = Reader(), BrokenReader(), Reader()
    for reader in (good, broken, later):
        s.subscribe(reader, 0)
    s.append("e1")
    assert s.running and (good.woken, later.woken) == (1, 1)
    assert broken.dropped and s.readers == 2 and not good.dropped
    assert "a reader of session uuuuuuuu failed" in caplog.text and "u" * 32 not in caplog.text
    s.append("e2")
    assert (good.woken, later.woken) == (2, 2)


@pytest.mark.gen_test
async def test_a_stream_whose_wake_fails_ends_alone_and_the_answer_goes_on(relay, fake):
    gate = asyncio.Event()

    async def script(handler, body, key):
        for frame in answer_frames(TOKENS[:2], finish=False):
            handler.write(frame)
            await handler.flush()
        await gate.wait()
        for frame in answer_frames(TOKENS[2:]):
            handler.write(frame)
            await handler.flush()

    fake.script = script
    created = await create_session(relay)
    url = relay.url + created["streamUrl"]
    broken = asyncio.ensure_future(fetch_stream(url))
    await eventually(lambda: len(relay.relay.streams) == 1)
    (handler,) = relay.relay.streams

    def fail() -> None:
        raise RuntimeError("a bug in one stream")

    handler.wake = fail  # this stream's wake breaks from now on
    whole = asyncio.ensure_future(fetch_stream(url))
    await eventually(lambda: len(relay.relay.streams) == 2)
    gate.set()
    res = await whole
    assert res.text() == "".join(TOKENS) and res.data[-1] == "[DONE]"
    with pytest.raises(HTTPStreamClosedError):  # ended alone: its connection closed
        await broken


def test_session_keeps_bounded_events_and_reports_trimmed_cursors():
    s = Session("u" * 32, "alice", "1", replayable=True, limits=SessionLimits(max_events=3))
    for i in range(5):
        s.append(f"e{i}")
    assert s.last_seq == 5
    assert not s.check_cursor(1) and s.check_cursor(2) and not s.check_cursor(6)
    frames = s.take(Reader(), 2)
    assert frames[0] == b"data: e2\nid: 3\n\n" and len(frames) == 3


def test_one_shot_session_drops_what_its_reader_took():
    s = Session("u" * 32, "alice", "1", replayable=False, limits=SessionLimits())
    r = Reader()
    s.subscribe(r, 0)
    s.append("a")
    s.append("b")
    assert len(s.take(r, 0)) == 2
    assert s._kept_bytes == 0 and not s._frames  # at once, not at the next take
    assert s.take(r, 2) == [] and s.check_cursor(2)


def test_one_shot_frames_taken_last_are_not_kept_until_the_next_event():
    """Regression (issue 17's first slice): a reader at the end makes no more takes, so
    a one-shot session held the batch it took last until the next event arrived: ~7 KB
    per open stream at 1,000 streams (scenario a)."""
    s = Session("u" * 32, "alice", "1", replayable=False, limits=SessionLimits())
    r = Reader()
    s.subscribe(r, 0)
    for i in range(3):
        s.append(f"e{i}")
    assert s.take(r, 0, limit=1) == [b"data: e0\nid: 1\n\n"]
    assert len(s._frames) == 2
    s.take(r, 1)
    assert s._kept_bytes == 0 and not s._frames
    s.append("e3")
    assert s.take(r, 3) == [b"data: e3\nid: 4\n\n"] and s.last_seq == 4


@pytest.mark.gen_test
async def test_reads_take_a_bounded_slice_and_the_reader_place_moves_by_what_it_took():
    s = Session("u" * 32, "alice", "1", replayable=True, limits=SessionLimits(high_water=100))
    r = Reader()
    s.subscribe(r, 0)
    for i in range(10):
        s.append(f"{i}" * 20)  # frames of 34 or 35 bytes
    room = s.room()
    assert room is not None
    first = s.take(r, 0, limit=70)
    assert len(first) == 2 and s.lag() == s.total_bytes - 68 and not room.done()
    assert len(s.take(r, 2, limit=1)) == 1  # at least one frame, whatever the limit
    assert len(s.take(r, 3, limit=1 << 20)) == 7 and s.lag() == 0 and room.done()


@pytest.mark.gen_test
async def test_slow_reader_makes_the_upstream_wait():
    s = Session("u" * 32, "alice", "1", replayable=False, limits=SessionLimits(high_water=100))
    r = Reader()
    s.subscribe(r, 0)
    assert s.room() is None
    for _ in range(10):
        s.append("x" * 20)
    room = s.room()
    assert room is not None and not room.done()
    s.take(r, 0)
    assert room.done()


def test_store_prune_removes_only_expired_sessions():
    store = MemoryStore(ttl=100)
    loop = asyncio.new_event_loop()
    old = loop.run_until_complete(store.create("a", "1", True))
    new = loop.run_until_complete(store.create("a", "1", True))
    old.last_activity -= 101
    assert store.prune() == 1
    assert list(store) == [new]
    assert old.state == "failed" and old.error.code == "expired"
    loop.close()
