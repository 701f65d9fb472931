"""Scale-out through Redis: real redis-server, relays as real processes on two ports.

The fake upstream runs in the test process; the relays are `python server.py`
subprocesses pointed at it and at one redis-server started on a free port.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tornado.iostream import IOStream

from relay import demo
from relay.redis_store import RedisStore
from relay.sessions import Session, SessionLimits
from tests.conftest import (
    ASK,
    create_session,
    cyclic_stream_garbage,
    eventually,
    fetch_stream,
    nothing_left,
)
from tests.fakeupstream import gated, hang, stream_tokens
from tests.processes import RelayProcess, free_port
from tests.streams import ANSWER_TOKENS as TOKENS
from tests.streams import (
    KEY,
    RawStream,
    error_code,
    keyed,
    keyed_reader_moves_to_b_and_leaves,
    read_until_id,
)

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def relays(relay_process, fake, redis_server):
    """Start relay processes sharing ``redis_server``: ``await relays(*extra_args)``."""

    async def start(*args: str) -> RelayProcess:
        return await relay_process(f"--upstream={fake.url}", f"--store={redis_server.url}", *args)

    return start


@pytest.mark.gen_test(timeout=40)
async def test_create_on_one_process_stream_from_another(relays, fake):
    a, b = await relays(), await relays()
    fake.script = stream_tokens(TOKENS, delay=0.01)
    created = await create_session(a)
    res = await fetch_stream(b.url + created["streamUrl"])
    assert res.status == 200
    assert res.text() == "".join(TOKENS)
    assert [int(e.id) for e in res.events] == list(range(1, len(TOKENS) + 3))


@pytest.mark.gen_test(timeout=40)
async def test_drop_mid_answer_and_resume_on_the_other_process(relays, fake):
    a, b = await relays(), await relays()
    fake.script = stream_tokens(TOKENS, delay=0.02)
    created = await create_session(a)
    await read_until_id(a, created["streamUrl"], 9)
    res = await fetch_stream(b.url + created["streamUrl"], headers={"Last-Event-ID": "9"})
    ids = [int(e.id) for e in res.events]
    assert ids == list(range(10, len(TOKENS) + 3))
    assert res.text() == "".join(TOKENS[9:])
    # And the same from the creating process once it has finished: 204, nothing left.
    res = await fetch_stream(a.url + created["streamUrl"], headers={"Last-Event-ID": str(ids[-1])})
    assert res.status == 204
    res = await fetch_stream(b.url + created["streamUrl"], headers={"Last-Event-ID": str(ids[-1])})
    assert res.status == 204


@pytest.mark.gen_test(timeout=40)
async def test_delete_on_b_cancels_the_upstream_call_running_on_a(relays, fake):
    a, b = await relays(), await relays()
    fake.script = hang(60)
    created = await create_session(a)
    reader = IOStream(socket.socket())
    await reader.connect(("127.0.0.1", a.port))
    await reader.write(b"GET %s HTTP/1.1\r\nHost: x\r\n\r\n" % created["streamUrl"].encode())
    await asyncio.wait_for(reader.read_until(b"retry: 3000\n"), 5)  # attached on A
    res = await fetch_stream(b.url + f"/aianswer/sessions/{created['uid']}", method="DELETE")
    assert res.status == 204
    await asyncio.wait_for(fake.disconnected.wait(), 2)
    rest = await asyncio.wait_for(reader.read_until(b"\n\n"), 5)
    assert b"event: error" in rest and b'"cancelled"' in rest
    assert (await fetch_stream(b.url + created["streamUrl"])).status == 404


@pytest.mark.gen_test(timeout=30)
async def test_delete_on_b_makes_later_gets_on_a_404_too(make_relay, fake, redis_server):
    a = make_relay(upstream=fake.url, store=redis_server.url)
    b = make_relay(upstream=fake.url, store=redis_server.url)
    fake.script = hang(60)
    created = await create_session(a)  # A runs the call and keeps the session in memory
    res = await fetch_stream(b.url + f"/aianswer/sessions/{created['uid']}", method="DELETE")
    assert res.status == 204
    await asyncio.wait_for(fake.disconnected.wait(), 2)  # A has the cancel message
    for rs in (a, b):
        res = await fetch_stream(rs.url + created["streamUrl"])
        assert res.status == 404 and res.json()["error"]["code"] == "not_found", rs.url
    assert len(a.relay.store) == 0


@pytest.mark.gen_test(timeout=40)
async def test_session_expires_through_redis(relays, fake, redis_server):
    a = await relays("--session-ttl=1", "--prune-interval=0.2")
    b = await relays("--session-ttl=1", "--prune-interval=0.2")
    fake.script = stream_tokens(["a"])
    created = await create_session(a)
    assert (await fetch_stream(b.url + created["streamUrl"])).text() == "a"
    r = redis_server.client()
    keys = [f"relay:{{{created['uid']}}}:meta", f"relay:{{{created['uid']}}}:events"]
    assert r.exists(*keys) == 2
    await asyncio.sleep(2.5)
    assert r.exists(*keys) == 0  # Redis expired them
    assert (await fetch_stream(b.url + created["streamUrl"])).status == 404
    assert (await fetch_stream(a.url + created["streamUrl"])).status == 404


@pytest.mark.gen_test(timeout=60)
async def test_redis_killed_mid_stream_and_restarted(relays, fake, redis_server):
    a, b = await relays(), await relays()
    fake.script = stream_tokens(TOKENS, delay=0.05)
    created = await create_session(a)
    reader_b = asyncio.ensure_future(fetch_stream(b.url + created["streamUrl"], timeout=40))
    one_shot = asyncio.ensure_future(fetch_stream(a.url + "/aianswer/streamAsk", ASK, timeout=40))
    await asyncio.sleep(0.5)
    redis_server.stop()
    # Redis down: new sessions are refused quickly and clearly; one-shot streams go on.
    began = time.monotonic()
    res = await fetch_stream(a.url + "/aianswer/sessions", ASK)
    assert res.status == 503 and res.json()["error"]["code"] == "store_unavailable"
    assert time.monotonic() - began < 5
    await asyncio.sleep(0.5)
    redis_server.start()  # same port, empty: the writer rewrites what Redis lost
    assert (await one_shot).text() == "".join(TOKENS)
    res = await reader_b
    assert res.text() == "".join(TOKENS)
    ids = [int(e.id) for e in res.events]
    assert ids == list(range(1, len(TOKENS) + 3))
    # And Redis serves new sessions again.
    created = await create_session(a)
    res = await fetch_stream(b.url + created["streamUrl"])
    assert res.text() == "".join(TOKENS)


@pytest.mark.gen_test(timeout=30)
async def test_one_shot_stream_never_touches_redis_even_frozen(
    make_relay, fake, redis_server, caplog
):
    rs = make_relay(upstream=fake.url, store=redis_server.url)
    r = redis_server.client()
    await eventually(lambda: r.pubsub_numsub("relay:cancel")[0][1] == 1)  # the listener is in
    before = r.info("commandstats")
    fake.script = stream_tokens(TOKENS)
    os.kill(redis_server.proc.pid, signal.SIGSTOP)
    try:
        res = await fetch_stream(rs.url + "/aianswer/streamAsk", ASK, timeout=5)
        assert res.text() == "".join(TOKENS)
        await asyncio.sleep(0.5)  # the handler's end, and whatever it would send
    finally:
        os.kill(redis_server.proc.pid, signal.SIGCONT)
    await asyncio.sleep(0.2)  # anything queued for Redis is served now
    after = r.info("commandstats")
    sent = {name: stats for name, stats in after.items() if before.get(name) != stats}
    assert set(sent) <= {"cmdstat_info", "cmdstat_pubsub|numsub"}, sent
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    await eventually(lambda: nothing_left(rs))


@pytest.mark.gen_test(timeout=40)
async def test_workers_2_serves_from_both_processes(relays, fake):
    rp = await relays("--workers=2")
    fake.script = stream_tokens(["w"])
    pids = set()
    for _ in range(60):
        res = await fetch_stream(rp.url + "/healthz")
        pids.add(res.json()["pid"])
        if len(pids) == 2:
            break
    assert len(pids) == 2 and rp.proc.pid not in pids
    results = await asyncio.gather(
        *(fetch_stream(rp.url + "/aianswer/streamAsk", ASK) for _ in range(10))
    )
    assert [r.text() for r in results] == ["w"] * 10
    created = await create_session(rp)
    assert (await fetch_stream(rp.url + created["streamUrl"])).text() == "w"
    assert rp.stop() == 0


@pytest.mark.gen_test(timeout=40)
async def test_workers_2_without_upstream_each_run_their_own_demo(relay_process, redis_server):
    rp = await relay_process(
        "--workers=2", f"--store={redis_server.url}", "--demo-token-delay=0.001"
    )
    try:
        results = await asyncio.gather(
            *(fetch_stream(rp.url + "/aianswer/streamAsk", ASK) for _ in range(6))
        )
        assert {r.text() for r in results} == {demo.answer_for(ASK["aiQuestion"])}
        assert (await fetch_stream(rp.url + "/demo/v1/chat/completions", ASK)).status == 404
        # One demo server per worker, each on a loopback port of its own.
        demos = re.findall(r"embedded demo at (http://127\.0\.0\.1:\d+)/", rp.log.read_text())
        assert len(set(demos)) == 2, demos
    finally:
        assert rp.stop() == 0


def test_workers_with_the_memory_store_is_refused():
    proc = subprocess.run(
        [sys.executable, "server.py", "--workers=2"],
        check=False,
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert "--store=redis://" in proc.stderr


@pytest.mark.gen_test(timeout=30)
async def test_redis_sessions_and_their_mirrors_leave_no_cycles(
    make_relay, fake, redis_server, clean_gc
):
    a = make_relay(upstream=fake.url, store=redis_server.url)
    b = make_relay(upstream=fake.url, store=redis_server.url)
    fake.script = stream_tokens(["a", "b"])
    created = await create_session(a)
    assert (await fetch_stream(a.url + created["streamUrl"])).text() == "ab"
    assert (await fetch_stream(b.url + created["streamUrl"])).text() == "ab"  # a mirror
    await a.relay.store.remove(created["uid"])
    await eventually(lambda: nothing_left(a) and nothing_left(b))
    await eventually(lambda: len(a.relay.store._tasks) == 1)  # the writer is done
    garbage = cyclic_stream_garbage()
    assert garbage == [], garbage


@pytest.mark.gen_test(timeout=40)
async def test_an_attach_on_another_process_counts_for_the_attach_grace(relays, fake):
    a, b = await relays("--attach-grace=1"), await relays("--attach-grace=1")
    fake.script = stream_tokens(TOKENS, delay=0.06)  # ~2.5 s: past the grace
    attached, lonely = await create_session(a), await create_session(a)
    res = await fetch_stream(b.url + attached["streamUrl"])
    assert res.text() == "".join(TOKENS) and res.events[-1].data == "[DONE]"
    late = await fetch_stream(b.url + lonely["streamUrl"])
    assert late.events[-1].event == "error" and '"not_attached"' in late.events[-1].data


# -- idempotent one-shot streams across processes -------------------------------------


@pytest.mark.gen_test(timeout=40)
async def test_keyed_answer_started_on_a_is_attached_by_a_repeat_on_b(relays, fake, redis_server):
    a, b = await relays("--resume-grace=0.5"), await relays("--resume-grace=0.5")
    gate = asyncio.Event()
    fake.script = gated(TOKENS, 5, gate)
    first = await RawStream.open(a.url)
    await first.until_id(5)
    uid = first.head.headers["x-relay-session"]
    first.close()
    await asyncio.sleep(0.2)
    repeat = asyncio.ensure_future(
        fetch_stream(b.url + "/aianswer/streamAsk", ASK, headers=keyed(**{"Last-Event-ID": "5"}))
    )
    await asyncio.sleep(1.0)  # past A's grace: B's reader keeps the answer alive
    assert not fake.disconnected.is_set()
    gate.set()
    res = await repeat
    assert res.status == 200 and res.headers["x-relay-session"] == uid
    assert [int(e.id) for e in res.events] == list(range(6, len(TOKENS) + 3))
    assert res.text() == "".join(TOKENS[5:])
    # Another body under the same key is refused on either process.
    other = {**ASK, "aiQuestion": "another"}
    res = await fetch_stream(b.url + "/aianswer/streamAsk", other, headers=keyed())
    assert res.status == 422 and res.json()["error"]["code"] == "idempotency_key_reused"
    assert len(fake.requests) == 1
    # Redis holds a digest of (client, key), never the key itself, for the session TTL.
    r = redis_server.client()
    names = [k.decode() for k in r.keys("relay:idem:*")]
    assert len(names) == 1 and 0 < r.ttl(names[0]) <= 301
    stored = r.hgetall(names[0])
    assert stored[b"uid"].decode() == uid
    assert not any(KEY in k.decode() for k in r.keys("*"))
    assert not any(KEY.encode() in v for v in stored.values())


@pytest.mark.gen_test(timeout=40)
async def test_a_repeat_on_b_takes_the_answer_over_from_a_stream_on_a(relays, fake):
    a, b = await relays(), await relays()
    gate = asyncio.Event()
    fake.script = gated(TOKENS, 3, gate)
    first = await RawStream.open(a.url)
    await first.until_id(3)
    second = await RawStream.open(b.url, headers={"Last-Event-ID": "3"})
    rest = await first.to_end()
    assert error_code(rest[-1]) == "taken_over"
    assert await asyncio.wait_for(first.stream.read_until_close(), 5) == b""
    gate.set()
    events = await second.to_end()
    second.close()
    assert [int(e.id) for e in events] == list(range(4, len(TOKENS) + 3))
    assert len(fake.requests) == 1


@pytest.mark.gen_test(timeout=40)
async def test_a_keyed_answer_whose_reader_on_b_left_is_cancelled_on_a_after_the_grace(
    relays, fake
):
    a, b = await relays("--resume-grace=0.5"), await relays("--resume-grace=0.5")
    left = await keyed_reader_moves_to_b_and_leaves(a, b, fake)
    await asyncio.wait_for(fake.disconnected.wait(), 5)
    assert time.monotonic() - left >= 0.4
    res = await fetch_stream(b.url + "/aianswer/streamAsk", ASK, headers=keyed())
    assert [e.id for e in res.events[:3]] == ["1", "2", "3"]
    assert error_code(res.events[-1]) == "not_attached"


@pytest.mark.gen_test(timeout=40)
async def test_a_keyed_answer_nobody_came_back_for_on_its_own_process_is_cancelled(relays, fake):
    a = await relays("--resume-grace=0.5")
    fake.script = gated(TOKENS, 2, asyncio.Event(), finish=False)
    first = await RawStream.open(a.url)
    await first.until_id(2)
    first.close()
    await asyncio.wait_for(fake.disconnected.wait(), 5)
    res = await fetch_stream(a.url + "/aianswer/streamAsk", ASK, headers=keyed())
    assert error_code(res.events[-1]) == "not_attached"


@pytest.mark.gen_test(timeout=40)
async def test_delete_on_b_of_a_keyed_answer_on_a_cancels_it_and_frees_the_key(relays, fake):
    a, b = await relays(), await relays()
    fake.script = gated(TOKENS, 2, asyncio.Event(), finish=False)
    first = await RawStream.open(a.url)
    await first.until_id(2)
    uid = first.head.headers["x-relay-session"]
    res = await fetch_stream(b.url + f"/aianswer/sessions/{uid}", method="DELETE")
    assert res.status == 204
    await asyncio.wait_for(fake.disconnected.wait(), 5)
    assert error_code((await first.to_end())[-1]) == "cancelled"
    first.close()
    # The index still names the deleted session: the key counts as free and is claimed anew.
    fake.script = stream_tokens(TOKENS)
    res = await fetch_stream(b.url + "/aianswer/streamAsk", ASK, headers=keyed())
    assert res.text() == "".join(TOKENS) and res.headers["x-relay-session"] != uid
    assert len(fake.requests) == 2


@pytest.mark.gen_test(timeout=30)
async def test_keyed_requests_need_redis_and_unkeyed_ones_do_not(make_relay, fake, redis_server):
    rs = make_relay(upstream=fake.url, store=redis_server.url)
    fake.script = stream_tokens(TOKENS)
    url = rs.url + "/aianswer/streamAsk"
    os.kill(redis_server.proc.pid, signal.SIGSTOP)
    try:
        began = time.monotonic()
        res = await fetch_stream(url, ASK, headers=keyed(), timeout=10)
        assert res.status == 503 and res.json()["error"]["code"] == "store_unavailable"
        assert time.monotonic() - began < 5
        assert (await fetch_stream(url, ASK, timeout=5)).text() == "".join(TOKENS)
    finally:
        os.kill(redis_server.proc.pid, signal.SIGCONT)
    assert (await fetch_stream(url, ASK, headers=keyed())).text() == "".join(TOKENS)


@pytest.mark.gen_test(timeout=30)
async def test_a_client_that_leaves_while_its_keyed_answer_is_set_up_gets_the_grace(
    make_relay, fake, redis_server
):
    rs = make_relay(upstream=fake.url, store=redis_server.url, resume_grace=0.3)
    fake.script = gated(TOKENS, 2, asyncio.Event(), finish=False)
    os.kill(redis_server.proc.pid, signal.SIGSTOP)  # the request waits on the store
    try:
        raw = await RawStream.open(rs.url)
        await asyncio.sleep(0.3)
        raw.close()
        await asyncio.sleep(0.3)
    finally:
        os.kill(redis_server.proc.pid, signal.SIGCONT)
    await eventually(lambda: len(fake.requests) == 1, 5)  # started for nobody ...
    await asyncio.wait_for(fake.disconnected.wait(), 5)  # ... and cancelled after the grace


@pytest.mark.gen_test(timeout=30)
async def test_keyed_bookkeeping_with_redis_unreachable_fails_safe(caplog):
    store = RedisStore(f"redis://127.0.0.1:{free_port()}/0", 300)
    mirror = Session("b" * 32, "anonymous", "1", True, SessionLimits(), runs_call=False)
    mirror.keyed = "c" * 64
    try:
        await store.take_over(mirror, "t1")  # logged, not raised: the stream goes on
        assert mirror.reader == "t1"
        assert not await store.is_reader(mirror, "t1")  # unknown: never cancel on a guess
        await store.abandon(mirror)  # runs elsewhere, and the message cannot go: logged
    finally:
        await store.close()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("takeover" in w for w in warnings) and any("abandoned" in w for w in warnings)


@pytest.mark.gen_test(timeout=40)
async def test_the_writer_rewrites_what_a_promoted_replica_missed(relays, fake, redis_server):
    """After a failover the new master may lack the last entries the old one acknowledged
    (replication is asynchronous): the writer's next append finds the stream ending
    earlier than it left it, and rewrites the rest from memory; readers see no gap."""
    a, b = await relays(), await relays()
    gate = asyncio.Event()
    fake.script = gated(TOKENS, 10, gate)
    created = await create_session(a)
    uid = created["uid"]
    r = redis_server.client()
    events, meta = f"relay:{{{uid}}}:events", f"relay:{{{uid}}}:meta"
    await eventually(lambda: r.xlen(events) == 10, 5)
    ahead = asyncio.ensure_future(  # a reader that read event 10 from the old master
        fetch_stream(b.url + created["streamUrl"], headers={"Last-Event-ID": "10"})
    )
    await asyncio.sleep(0.3)
    # The new master: the stream without what the old one had not passed on yet.
    kept = r.xrange(events, "-", "7-0")
    r.delete(events)
    for entry_id, fields in kept:
        r.xadd(events, fields, id=entry_id)
    r.hset(meta, "last_seq", 7)
    late = asyncio.ensure_future(
        fetch_stream(b.url + created["streamUrl"], headers={"Last-Event-ID": "7"})
    )
    await asyncio.sleep(0.5)
    gate.set()
    res = await late
    assert [int(e.id) for e in res.events] == list(range(8, len(TOKENS) + 3))
    assert res.text() == "".join(TOKENS[7:])
    res = await ahead
    assert [int(e.id) for e in res.events] == list(range(11, len(TOKENS) + 3))
    assert res.text() == "".join(TOKENS[10:])
    entries = r.xrange(events)
    assert [e[0] for e in entries][-3:] == [
        f"{len(TOKENS) + 1}-0".encode(),
        f"{len(TOKENS) + 2}-0".encode(),
        f"{len(TOKENS) + 2}-1".encode(),
    ]
    assert len(entries) == len(TOKENS) + 3  # every event once, and the end


@pytest.mark.gen_test(timeout=30)
@pytest.mark.parametrize(
    ("limits", "kept"),
    [
        (SessionLimits(max_events=5), list(range(8, 13))),  # by count
        (SessionLimits(max_bytes=2_500), [11, 12]),  # by bytes: two 1 KB events fit
    ],
)
async def test_redis_keeps_no_more_of_a_session_than_memory_does(redis_server, limits, kept):
    store = RedisStore(redis_server.url, 300, limits)
    store.start()
    r = redis_server.client()
    try:
        session = await store.create("anonymous", "1", replayable=True)
        events = f"relay:{{{session.uid}}}:events"
        for i in range(12):
            session.append("x" * 1000 + str(i))
            await asyncio.sleep(0.01)  # one append script each
        session.finish()
        await eventually(lambda: r.exists(events) and r.xrevrange(events, count=1)[0][0] == b"12-1")
        assert [e[0] for e in r.xrange(events)] == [f"{n}-0".encode() for n in kept] + [b"12-1"]
        assert session.first_seq == kept[0]  # what memory keeps, no more
    finally:
        await store.close()


@pytest.mark.gen_test(timeout=60)
async def test_more_readers_on_another_process_than_a_default_pool_holds(
    make_relay, fake, redis_server
):
    """Each reader following through Redis holds a connection in XREAD BLOCK: 120 of them,
    and new sessions and lookups beside them (redis-py's pool stops at 100 by default)."""
    a = make_relay(upstream=fake.url, store=redis_server.url)
    b = make_relay(upstream=fake.url, store=redis_server.url)
    gate = asyncio.Event()
    fake.script = gated(["x", "y"], 1, gate)
    sessions = [await create_session(a) for _ in range(120)]
    readers = [
        asyncio.ensure_future(fetch_stream(b.url + s["streamUrl"], timeout=40)) for s in sessions
    ]
    # More followers wait in XREAD BLOCK at once than a default pool has connections.
    await eventually(lambda: redis_server.client().info("clients")["blocked_clients"] > 100, 10)
    fake.script = stream_tokens(["z"])
    created = await create_session(b)
    assert (await fetch_stream(b.url + created["streamUrl"])).text() == "z"
    gate.set()
    results = await asyncio.gather(*readers)
    assert [r.text() for r in results] == ["xy"] * 120
