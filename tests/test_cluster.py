"""The store on a real Redis Cluster (redis-server 7 in cluster mode on loopback, made by
``redis-cli --cluster create``), served to relays running as real processes.

A three-master cluster is shared by the tests that leave it whole (flushed between them);
the tests that kill nodes start their own, with or without replicas.
"""

from __future__ import annotations

import asyncio
import socket
import time

import pytest
from tornado.iostream import IOStream

from relay import redis_bus, redis_store
from tests.conftest import ASK, create_session, eventually, fetch_stream
from tests.fakeupstream import gated, hang, stream_tokens
from tests.redisprocs import Cluster
from tests.streams import ANSWER_TOKENS as TOKENS
from tests.streams import (
    RawStream,
    error_code,
    ids,
    keyed,
    keyed_reader_moves_to_b_and_leaves,
    read_until_id,
    resume_through_503s,
)


@pytest.fixture(scope="session")
def cluster3(tmp_path_factory):
    cluster = Cluster(tmp_path_factory.mktemp("cluster3"))
    cluster.start()
    yield cluster
    cluster.stop()


@pytest.fixture
def cluster(cluster3):
    cluster3.wait_ok()
    cluster3.flush()
    return cluster3


def relays_on(relay_process, fake, url: str):
    async def start(*args: str):
        return await relay_process(f"--upstream={fake.url}", f"--store={url}", *args)

    return start


@pytest.fixture
def relays(relay_process, fake, cluster):
    """Relay processes on the shared cluster: ``await relays(*extra_args)``."""
    return relays_on(relay_process, fake, cluster.url)


def keys(uid: str) -> list[str]:
    return [f"relay:{{{uid}}}:meta", f"relay:{{{uid}}}:events"]


@pytest.mark.gen_test(timeout=60)
async def test_cluster_100_sessions_are_all_created_and_spread_over_the_masters(
    relays, fake, cluster
):
    a, b = await relays(), await relays()
    fake.script = stream_tokens(["x"])
    results = await asyncio.gather(
        *(fetch_stream((a, b)[i % 2].url + "/aianswer/sessions", ASK) for i in range(100))
    )
    assert [r.status for r in results] == [201] * 100  # none 503: no CROSSSLOT, no MOVED
    uids = [r.json()["uid"] for r in results]
    by_master: dict[int, int] = {}
    for uid in uids:
        # Both keys of a session are in one slot, on the master that serves it.
        master = cluster.master_of(keys(uid)[0])
        await eventually(lambda m=master, u=uid: m.client().exists(*keys(u)) == 2, 5)
        by_master[master.port] = by_master.get(master.port, 0) + 1
    assert len(by_master) == 3, by_master
    for i, uid in enumerate(uids[:10]):
        other = (b, a)[i % 2]  # read from the relay that did not create it
        res = await fetch_stream(f"{other.url}/aianswer/stream/{uid}")
        assert res.status == 200 and res.text() == "x"


@pytest.mark.gen_test(timeout=60)
async def test_cluster_create_on_a_stream_from_b_resume_on_the_other_after_a_drop(relays, fake):
    a, b = await relays(), await relays()
    fake.script = stream_tokens(TOKENS, delay=0.01)
    created = await create_session(a)
    res = await fetch_stream(b.url + created["streamUrl"])
    assert res.text() == "".join(TOKENS) and ids(res) == list(range(1, len(TOKENS) + 3))
    # Read on B (a mirror), drop, resume on A (the owner); then the other way round.
    fake.script = stream_tokens(TOKENS, delay=0.02)
    for first, second in ((b, a), (a, b)):
        created = await create_session(a)
        await read_until_id(first, created["streamUrl"], 9)
        res = await fetch_stream(second.url + created["streamUrl"], headers={"Last-Event-ID": "9"})
        assert ids(res) == list(range(10, len(TOKENS) + 3))
        assert res.text() == "".join(TOKENS[9:])
        res = await fetch_stream(
            first.url + created["streamUrl"], headers={"Last-Event-ID": str(len(TOKENS) + 2)}
        )
        assert res.status == 204


@pytest.mark.gen_test(timeout=60)
async def test_cluster_delete_on_either_relay_cancels_the_call_on_a_and_gets_are_404(
    relays, fake, cluster
):
    a, b = await relays(), await relays()
    fake.script = hang(60)
    # Each relay reads a sharded channel of its own; nothing listens on a classic channel.
    await eventually(
        lambda: sum(len(n.client().pubsub_shardchannels()) for n in cluster.masters()) == 2, 5
    )
    assert all(n.client().pubsub_channels() == [] for n in cluster.running())
    for deleter in (b, a):
        fake.disconnected.clear()
        created = await create_session(a)
        reader = await RawGet.open(a, created["streamUrl"])
        before = cluster.commandstats()
        res = await fetch_stream(
            f"{deleter.url}/aianswer/sessions/{created['uid']}", method="DELETE"
        )
        assert res.status == 204
        await asyncio.wait_for(fake.disconnected.wait(), 3)  # A cancelled its call
        rest = await asyncio.wait_for(reader.stream.read_until(b"\n\n"), 5)
        assert b"event: error" in rest and b'"cancelled"' in rest
        reader.stream.close()
        for rp in (a, b):
            res = await fetch_stream(rp.url + created["streamUrl"])
            assert res.status == 404 and res.json()["error"]["code"] == "not_found"
        sent = delta(before, cluster.commandstats())
        published = {port: s.get("cmdstat_spublish", 0) for port, s in sent.items()}
        # From B: one SPUBLISH, to the one node of A's inbox; from A: none (it runs there).
        assert sorted(published.values()) == ([0, 0, 1] if deleter is b else [0, 0, 0])
        assert not any(s.get("cmdstat_publish") for s in sent.values())


class RawGet:
    """A GET of an event stream on a socket of its own, left open."""

    def __init__(self, stream) -> None:
        self.stream = stream

    @classmethod
    async def open(cls, rp, path: str) -> RawGet:
        stream = IOStream(socket.socket())
        await stream.connect(("127.0.0.1", rp.port))
        await stream.write(b"GET %s HTTP/1.1\r\nHost: x\r\n\r\n" % path.encode())
        await asyncio.wait_for(stream.read_until(b"retry: 3000\n"), 5)  # attached
        return cls(stream)


def delta(before: dict[int, dict], after: dict[int, dict]) -> dict[int, dict[str, int]]:
    """Commands each node ran between two `Cluster.commandstats` readings."""
    out = {}
    for port, stats in after.items():
        old = before.get(port, {})
        out[port] = {
            name: s["calls"] - old.get(name, {}).get("calls", 0)
            for name, s in stats.items()
            if s["calls"] != old.get(name, {}).get("calls", 0)
        }
    return out


@pytest.mark.gen_test(timeout=60)
async def test_cluster_sessions_expire(relays, fake, cluster):
    a = await relays("--session-ttl=1", "--prune-interval=0.2")
    b = await relays("--session-ttl=1", "--prune-interval=0.2")
    fake.script = stream_tokens(["a"])
    created = await create_session(a)
    assert (await fetch_stream(b.url + created["streamUrl"])).text() == "a"
    master = cluster.master_of(keys(created["uid"])[0])
    assert master.client().exists(*keys(created["uid"])) == 2
    await asyncio.sleep(2.5)
    assert master.client().exists(*keys(created["uid"])) == 0  # Redis expired them
    assert (await fetch_stream(b.url + created["streamUrl"])).status == 404
    assert (await fetch_stream(a.url + created["streamUrl"])).status == 404


@pytest.mark.gen_test(timeout=60)
async def test_cluster_keyed_repeat_on_b_attaches_and_takes_the_answer_over_from_a(
    relays, fake, cluster
):
    a, b = await relays(), await relays()
    gate = asyncio.Event()
    fake.script = gated(TOKENS, 3, gate)
    first = await RawStream.open(a.url)
    await first.until_id(3)
    uid = first.head.headers["x-relay-session"]
    second = await RawStream.open(b.url, headers={"Last-Event-ID": "3"})
    rest = await first.to_end()  # told through A's inbox
    assert error_code(rest[-1]) == "taken_over"
    first.close()
    gate.set()
    events = await second.to_end()
    second.close()
    assert second.head.headers["x-relay-session"] == uid
    assert [int(e.id) for e in events] == list(range(4, len(TOKENS) + 3))
    assert len(fake.requests) == 1
    # Another body under the same key is refused on either relay.
    res = await fetch_stream(
        a.url + "/aianswer/streamAsk", {**ASK, "aiQuestion": "x"}, headers=keyed()
    )
    assert res.status == 422


@pytest.mark.gen_test(timeout=60)
async def test_cluster_a_keyed_answer_whose_reader_on_b_left_is_cancelled_on_a(relays, fake):
    a, b = await relays("--resume-grace=0.5"), await relays("--resume-grace=0.5")
    left = await keyed_reader_moves_to_b_and_leaves(a, b, fake)
    await asyncio.wait_for(fake.disconnected.wait(), 5)  # B's "abandoned", in A's inbox
    assert time.monotonic() - left >= 0.4


@pytest.mark.gen_test(timeout=90)
async def test_cluster_slot_without_a_master_is_503_within_seconds_and_recovers(
    relay_process, fake, tmp_path
):
    cluster = Cluster(tmp_path)  # no replicas: a killed master leaves its slots unserved
    cluster.start()
    try:
        start = relays_on(relay_process, fake, cluster.url)
        a, b = await start(), await start()
        fake.script = stream_tokens(["x"])
        created = await create_session(a)
        victim = cluster.master_of(keys(created["uid"])[0])
        # A master that does not answer at all (frozen, or cut off): the same 503, in time.
        victim.freeze()
        try:
            began = time.monotonic()
            res = await fetch_stream(b.url + created["streamUrl"], timeout=20)
            assert res.status == 503 and 2.5 < time.monotonic() - began < 4
        finally:
            victim.thaw()
        cluster.wait_ok()
        assert (await fetch_stream(b.url + created["streamUrl"])).text() == "x"
        victim.kill()
        # A lookup on B (the session's slot has no master), and new sessions on any slot
        # once the cluster says it is down: 503 within the store's deadline, never a hang.
        requests = ((b.url + created["streamUrl"], None), (a.url + "/aianswer/sessions", ASK))
        for url, body in requests:
            began = time.monotonic()
            while True:
                asked = time.monotonic()
                res = await fetch_stream(url, body, timeout=20)
                assert time.monotonic() - asked < 4
                if res.status == 503:
                    break
                assert time.monotonic() - began < 5, "never 503"
                await asyncio.sleep(0.1)
            assert res.json()["error"]["code"] == "store_unavailable"
        began = time.monotonic()  # not ready once the cluster marks the master failed
        while (await fetch_stream(a.url + "/readyz")).status != 503:
            assert time.monotonic() - began < 5, "still ready"
            await asyncio.sleep(0.1)
        victim.start()  # same port and nodes.conf: back with its slots, and empty
        cluster.wait_ok()
        began = time.monotonic()
        while (res := await fetch_stream(a.url + "/aianswer/sessions", ASK)).status != 201:
            assert time.monotonic() - began < 10, "the relay did not recover by itself"
            await asyncio.sleep(0.2)
        assert (await fetch_stream(b.url + res.json()["streamUrl"])).text() == "x"
        await eventually(lambda: a.get(b"/readyz") == b'{"status": "ready"}', 3)
    finally:
        cluster.stop()


@pytest.mark.gen_test(timeout=90)
async def test_cluster_master_killed_mid_answer_its_replica_takes_over_and_readers_get_the_rest(
    relay_process, fake, tmp_path
):
    cluster = Cluster(tmp_path, replicas=1)
    cluster.start()
    try:
        start = relays_on(relay_process, fake, cluster.url)
        a, b = await start(), await start()
        gate = asyncio.Event()
        fake.script = gated(TOKENS, 10, gate, delay=0.05)  # the rest over ~2 s
        created = await create_session(a)
        follower = asyncio.ensure_future(fetch_stream(b.url + created["streamUrl"], timeout=60))
        await read_until_id(b, created["streamUrl"], 10)  # 10 tokens, then a drop
        master = cluster.master_of(keys(created["uid"])[0])
        master.kill()
        gate.set()  # the answer goes on while its slot has no master
        res, window = await resume_through_503s(b.url + created["streamUrl"], 10, 20)
        assert window < 15
        assert res.status == 200, res.raw
        assert ids(res) == list(range(11, len(TOKENS) + 3))  # no gap, no duplicate
        assert res.text() == "".join(TOKENS[10:])
        whole = await follower  # a reader attached all along waits, then gets the rest
        assert ids(whole) == list(range(1, len(TOKENS) + 3))
        assert whole.text() == "".join(TOKENS)
        assert cluster.master_of(keys(created["uid"])[0]) is not master  # its replica
        master.start()  # back, as the replica of its replica
        cluster.wait_synced()
        # The master of A's inbox fails, with a session on it: A's listener finds the new
        # master by itself; B, which only sent that session pipelines (no follower of its
        # own to notice), learns the new slot map too; and its DELETE (sent again until
        # someone hears it) cancels the call on A.
        fake.script = hang(60)
        fake.disconnected.clear()
        meta = keys((await create_session(a))["uid"])[0]
        proc = cluster.master_of(meta).client().hget(meta, "proc").decode()
        inbox_master = cluster.master_of(redis_bus.inbox(proc))
        for _ in range(40):
            created = await create_session(a)
            if cluster.master_of(keys(created["uid"])[0]) is inbox_master:
                break
        assert cluster.master_of(keys(created["uid"])[0]) is inbox_master
        # Its replica has the session (replication is asynchronous: a session created a
        # moment before the kill may not be there, and is then 404, as for everyone).
        assert inbox_master.client().execute_command("WAIT", 1, 5000) == 1
        inbox_master.kill()
        url = f"{b.url}/aianswer/sessions/{created['uid']}"
        began = time.monotonic()
        while (res := await fetch_stream(url, method="DELETE")).status == 503:
            assert time.monotonic() - began < 15, "B never found the new master"
            await asyncio.sleep(0.2)
        assert res.status == 204
        # B sends the cancel again until A's listener is back (MESSAGE_RETRY, 10 s).
        await asyncio.wait_for(fake.disconnected.wait(), redis_bus.MESSAGE_RETRY + 5)
        # And new sessions on that slot's new master work, from either relay.
        fake.script = stream_tokens(["y"])
        for rp in (a, b):
            created = await create_session(rp)
            assert (
                await fetch_stream((b if rp is a else a).url + created["streamUrl"])
            ).text() == "y"
    finally:
        cluster.stop()


@pytest.mark.gen_test(timeout=60)
async def test_cluster_limits_hold_across_relays(relays, fake):
    flags = ("--rate-limit=10", "--auth-tokens=t1:alice,t2:bob", "--max-answers-per-user=2")
    a, b = await relays(*flags), await relays(*flags)
    fake.script = stream_tokens(["x"])
    bob = {"Authorization": "Bearer t2"}
    results = [
        await fetch_stream((a, b)[i % 2].url + "/aianswer/streamAsk", ASK, headers=bob)
        for i in range(20)
    ]
    assert sorted(r.status for r in results) == [200] * 10 + [429] * 10
    fake.script = hang(60)
    alice = {"Authorization": "Bearer t1"}
    await create_session(a, alice)
    await create_session(b, alice)
    res = await fetch_stream(a.url + "/aianswer/sessions", ASK, headers=alice)
    assert res.status == 429 and res.json()["error"]["code"] == "too_many_answers"


@pytest.mark.gen_test(timeout=60)
async def test_cluster_a_relays_inbox_follows_its_slot_to_another_master(relays, fake, cluster):
    a, b = await relays(), await relays()
    fake.script = hang(60)
    created = await create_session(a)
    meta = keys(created["uid"])[0]
    channel = redis_bus.inbox(cluster.master_of(meta).client().hget(meta, "proc").decode())
    source = cluster.master_of(channel)
    target = next(n for n in cluster.masters() if n is not source)
    slot = source.client().execute_command("CLUSTER KEYSLOT", channel)
    target_id = target.client().execute_command("CLUSTER MYID").decode()
    # Resharding moves the (keyless) slot: the old owner unsubscribes A, which subscribes
    # again where the slot is now.
    for node in [target, source, *(n for n in cluster.masters() if n not in (source, target))]:
        node.client().execute_command("CLUSTER SETSLOT", slot, "NODE", target_id)
    await eventually(lambda: target.client().pubsub_shardnumsub(channel)[0][1] == 1, 10)
    res = await fetch_stream(f"{b.url}/aianswer/sessions/{created['uid']}", method="DELETE")
    assert res.status == 204
    await asyncio.wait_for(fake.disconnected.wait(), 5)


@pytest.mark.gen_test(timeout=30)
async def test_cluster_a_message_nobody_hears_is_sent_again_then_dropped(
    cluster, monkeypatch, caplog
):
    monkeypatch.setattr(redis_bus, "MESSAGE_RETRY", 0.6)
    store = redis_store.RedisStore(cluster.url, 300)
    try:
        before = cluster.commandstats()
        await store.bus.post("0123456789abcdef", "cancel", "a" * 32)  # its process is gone
        await eventually(lambda: any("unheard" in r.getMessage() for r in caplog.records), 5)
        sent = delta(before, cluster.commandstats())
        published = [s.get("cmdstat_spublish", 0) for s in sent.values()]
        assert sum(published) >= 3 and sorted(published)[-2] == 0  # again, to one node only
    finally:
        await store.close()


@pytest.mark.gen_test(timeout=90)
async def test_cluster_quiet_relays_inbox_master_fails_and_its_listener_finds_the_new_one(
    relay_process, fake, tmp_path
):
    """redis-py refreshes a cluster client's slot map only when one of the client's own
    commands fails, and a relay whose sessions live on other nodes sends none to the node
    of its inbox: its listener must find the new master of that slot by itself."""
    cluster = Cluster(tmp_path, replicas=1)
    cluster.start()
    try:
        start = relays_on(relay_process, fake, cluster.url)
        a, b = await start(), await start()
        fake.script = hang(60)
        meta = keys((await create_session(a))["uid"])[0]
        proc = cluster.master_of(meta).client().hget(meta, "proc").decode()
        inbox_master = cluster.master_of(redis_bus.inbox(proc))
        for _ in range(40):  # a session of A's on another node than A's inbox
            created = await create_session(a)
            if cluster.master_of(keys(created["uid"])[0]) is not inbox_master:
                break
        assert cluster.master_of(keys(created["uid"])[0]) is not inbox_master
        inbox_master.kill()
        cluster.wait_ok()  # its replica is the master now
        fake.disconnected.clear()
        res = await fetch_stream(f"{b.url}/aianswer/sessions/{created['uid']}", method="DELETE")
        assert res.status == 204
        # B sends the cancel again for MESSAGE_RETRY (10 s) while nobody hears it: A's
        # listener may find the new master at the last try, so wait that and a margin (a
        # 10 s wait timed out once in CI, at the edge of the window).
        await asyncio.wait_for(fake.disconnected.wait(), redis_bus.MESSAGE_RETRY + 5)
    finally:
        cluster.stop()
