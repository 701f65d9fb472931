"""Limits across processes: with a Redis store, --rate-limit and the answer caps count in
Redis (relay/shared_limits.py), and in each process while Redis does not answer."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import signal
import time

import pytest

from relay import shared_limits
from tests.conftest import ASK, create_session, eventually, fetch_stream
from tests.fakeupstream import hang, stream_tokens
from tests.redis_servers import RedisServer

BEARER = {"Authorization": "Bearer t1"}


@pytest.fixture
def redis_server(tmp_path):
    server = RedisServer(tmp_path)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def relays(relay_process, fake, redis_server):
    """Relay processes sharing ``redis_server``: ``await relays(*extra_args)``."""

    async def start(*args: str):
        return await relay_process(f"--upstream={fake.url}", f"--store={redis_server.url}", *args)

    return start


def statuses(results) -> list[int]:
    return sorted(r.status for r in results)


def gauge(text: str, name: str) -> float:
    return float(re.search(rf"^{name} (\S+)$", text, re.MULTILINE).group(1))


@pytest.mark.gen_test(timeout=40)
async def test_two_relays_with_rate_limit_10_let_one_client_start_10_streams_not_20(
    relays, fake, redis_server
):
    a, b = await relays("--rate-limit=10"), await relays("--rate-limit=10")
    fake.script = stream_tokens(["x"])
    results = [
        await fetch_stream((a, b)[i % 2].url + "/aianswer/streamAsk", ASK) for i in range(20)
    ]
    assert statuses(results) == [200] * 10 + [429] * 10
    refused = [r for r in results if r.status == 429]
    assert {r.json()["error"]["code"] for r in refused} == {"rate_limited"}
    assert all(int(r.headers["retry-after"]) >= 1 for r in refused)
    assert len(fake.requests) == 10
    # Session posts draw on the same budget; the bucket is one key, named by a digest.
    assert (await fetch_stream(b.url + "/aianswer/sessions", ASK)).status == 429
    names = [k.decode() for k in redis_server.client().keys("relay:rate:*")]
    assert len(names) == 1 and "127.0.0.1" not in names[0]
    assert 0 < redis_server.client().pttl(names[0]) <= 60_000


@pytest.mark.gen_test(timeout=40)
async def test_the_per_user_cap_holds_across_relays_and_frees_with_the_answers(
    relays, fake, redis_server
):
    flags = ("--auth-tokens=t1:alice,t2:bob", "--max-answers-per-user=2")
    a, b = await relays(*flags), await relays(*flags)
    fake.script = hang(60)
    first = await create_session(a, BEARER)
    await create_session(b, BEARER)
    res = await fetch_stream(a.url + "/aianswer/sessions", ASK, headers=BEARER)
    assert res.status == 429 and res.json()["error"]["code"] == "too_many_answers"
    res = await fetch_stream(b.url + "/aianswer/streamAsk", ASK, headers=BEARER, timeout=2)
    assert res.status == 429
    other = await fetch_stream(
        a.url + "/aianswer/sessions", ASK, headers={"Authorization": "Bearer t2"}
    )
    assert other.status == 201  # bob's own two
    # An answer that ends (here: deleted on the other relay) gives its place back.
    res = await fetch_stream(
        f"{b.url}/aianswer/sessions/{first['uid']}", method="DELETE", headers=BEARER
    )
    assert res.status == 204
    await eventually(lambda: len(redis_server.client().zrange(alice(), 0, -1)) == 1, 5)
    assert (await fetch_stream(b.url + "/aianswer/sessions", ASK, headers=BEARER)).status == 201


def alice() -> str:
    return shared_limits.answers_key("user:alice")


@pytest.mark.gen_test(timeout=40)
async def test_the_per_address_cap_holds_across_relays(relays, fake):
    a, b = await relays("--max-answers-per-address=1"), await relays("--max-answers-per-address=1")
    fake.script = hang(60)
    await create_session(a)
    res = await fetch_stream(b.url + "/aianswer/sessions", ASK)
    assert res.status == 429 and res.json()["error"]["code"] == "too_many_answers"


@pytest.mark.gen_test(timeout=40)
async def test_a_lease_nobody_renews_ends_so_a_crashed_process_leaks_no_place(
    relays, fake, redis_server
):
    a = await relays("--auth-tokens=t1:alice", "--max-answers-per-user=1")
    r = redis_server.client()
    seconds, micros = r.time()
    # What a process that died while running one of alice's answers left behind.
    r.zadd(alice(), {"crashed": seconds * 1000 + micros // 1000 + 1500})
    fake.script = stream_tokens(["x"])
    res = await fetch_stream(a.url + "/aianswer/streamAsk", ASK, headers=BEARER)
    assert res.status == 429
    await asyncio.sleep(1.6)
    res = await fetch_stream(a.url + "/aianswer/streamAsk", ASK, headers=BEARER)
    assert res.status == 200 and res.text() == "x"
    await eventually(lambda: r.zcard(alice()) == 0, 5)  # its own lease went when it ended


@pytest.mark.gen_test(timeout=40)
async def test_a_running_answer_keeps_its_lease_past_the_lease_time(
    make_relay, fake, redis_server, monkeypatch
):
    monkeypatch.setattr(shared_limits, "LEASE_MS", 600)
    monkeypatch.setattr(shared_limits, "RENEW", 0.2)
    settings = {
        "upstream": fake.url,
        "store": redis_server.url,
        "auth_tokens": {"t1": "alice"},
        "max_answers_per_user": 1,
    }
    a, b = make_relay(**settings), make_relay(**settings)
    fake.script = hang(60)
    created = await create_session(a, BEARER)
    await asyncio.sleep(1.5)  # over two lease times
    res = await fetch_stream(b.url + "/aianswer/sessions", ASK, headers=BEARER)
    assert res.status == 429
    await a.relay.store.remove(created["uid"])
    await eventually(lambda: redis_server.client().zcard(alice()) == 0, 3)
    assert (await fetch_stream(b.url + "/aianswer/sessions", ASK, headers=BEARER)).status == 201


@pytest.mark.gen_test(timeout=60)
async def test_redis_stopped_each_relay_counts_alone_and_says_so(relays, fake, redis_server):
    a, b = await relays("--rate-limit=3"), await relays("--rate-limit=3")
    fake.script = stream_tokens(["x"])
    url = "/aianswer/streamAsk"
    assert (await fetch_stream(a.url + url, ASK)).status == 200  # one of the shared 3
    redis_server.stop()
    began = time.monotonic()
    results = [await fetch_stream(rp.url + url, ASK) for rp in (a, b) for _ in range(4)]
    assert time.monotonic() - began < 5
    # Each relay alone: its own 3 (unkeyed one-shot streams need no Redis otherwise).
    assert [r.status for r in results] == [200, 200, 200, 429] * 2
    for rp in (a, b):
        metrics = (await fetch_stream(rp.url + "/metrics")).body.decode()
        assert gauge(metrics, "relay_limits_local") == 1
    redis_server.start()
    for rp in (a, b):
        await eventually(lambda rp=rp: "relay_limits_local 0.0" in rp.get(b"/metrics").decode(), 5)
        log = rp.log.read_text()
        assert log.count("count in this process only") == 1, log
        assert log.count("the limits count across processes") == 1, log
    # Back on the shared bucket (Redis restarted empty: a fresh one).
    results = [await fetch_stream(rp.url + url, ASK) for rp in (a, b) for _ in range(2)]
    assert statuses(results) == [200, 200, 200, 429]


@pytest.mark.gen_test(timeout=40)
async def test_frozen_redis_costs_a_new_stream_at_most_the_limit_timeout(
    make_relay, fake, redis_server, caplog
):
    caplog.set_level(logging.INFO, logger="relay.limits")
    rs = make_relay(upstream=fake.url, store=redis_server.url, rate_limit=5)
    fake.script = stream_tokens(["x"])
    os.kill(redis_server.proc.pid, signal.SIGSTOP)
    try:
        began = time.monotonic()
        res = await fetch_stream(rs.url + "/aianswer/streamAsk", ASK, timeout=5)
        assert res.status == 200 and time.monotonic() - began < 2
        began = time.monotonic()  # counting alone now: no wait at all
        res = await fetch_stream(rs.url + "/aianswer/streamAsk", ASK, timeout=5)
        assert res.status == 200 and time.monotonic() - began < 0.5
        assert rs.relay.shared_limits.local
    finally:
        os.kill(redis_server.proc.pid, signal.SIGCONT)
    await eventually(lambda: not rs.relay.shared_limits.local, 5)
    messages = [r.getMessage() for r in caplog.records if r.name == "relay.limits"]
    assert len(messages) == 2, messages


@pytest.mark.gen_test(timeout=30)
async def test_no_limit_set_means_no_limit_traffic(make_relay, fake, redis_server):
    rs = make_relay(upstream=fake.url, store=redis_server.url)
    assert rs.relay.shared_limits is None
    fake.script = stream_tokens(["x"])
    assert (await fetch_stream(rs.url + "/aianswer/streamAsk", ASK)).status == 200
    assert redis_server.client().keys("relay:rate:*") == []
    assert redis_server.client().keys("relay:answers:*") == []
