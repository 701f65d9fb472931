"""Hold under attack: what a client can make the relay spend, each bound tested from outside.

Each test is named after the finding it pins (issue 12). Memory bounds are read
from a real relay process's RSS with generous margins, never exact figures.
"""

from __future__ import annotations

import asyncio
import json
import socket

import pytest
from tornado.iostream import IOStream

from tests.conftest import ASK, create_session, eventually, fetch_stream, nothing_left
from tests.fakeupstream import answer_frames, send_frames


async def raw_get(port: int, path: str, rcvbuf: int = 4096) -> IOStream:
    """GET ``path`` on a socket with a small receive buffer, and read nothing."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    stream = IOStream(sock)
    await stream.connect(("127.0.0.1", port))
    await stream.write(b"GET %s HTTP/1.1\r\nHost: x\r\n\r\n" % path.encode())
    return stream


@pytest.mark.gen_test(timeout=60)
async def test_reconnecting_readers_do_not_multiply_memory_by_the_session_size(relay_process, fake):
    # One finished session of 7,000 events (~7.8 MB kept), then 200 readers that
    # attach and never read: each may hold one slice (256 KiB) queued, not a copy
    # of the session (before: +1.5 GB).
    tokens = ["x" * 1000] * 7000
    fake.script = send_frames([b"".join(answer_frames(tokens))])
    rp = await relay_process(f"--upstream={fake.url}", "--send-timeout=60")
    created = await create_session(rp)
    whole = await fetch_stream(rp.url + created["streamUrl"], timeout=30)
    assert whole.text() == "".join(tokens)
    before = rp.rss_bytes()
    readers = [await raw_get(rp.port, created["streamUrl"]) for _ in range(200)]
    await asyncio.sleep(2.0)
    grown = rp.rss_bytes() - before
    assert grown < 150 << 20, f"RSS grew {grown >> 20} MiB for 200 stalled readers"
    for reader in readers:
        reader.close()
    # The relay serves normally after.
    again = await fetch_stream(rp.url + created["streamUrl"], timeout=30)
    assert again.text() == "".join(tokens)


# -- paid upstream calls: one admission decision --------------------------------------------


def first_token_then_hang(seconds: float = 30):
    return send_frames(answer_frames(["a"], finish=False), then_hang=seconds)


async def post_session(rs, headers: dict[str, str] | None = None):
    return await fetch_stream(rs.url + "/aianswer/sessions", ASK, headers=headers)


@pytest.mark.gen_test(timeout=30)
async def test_session_posts_cannot_open_paid_calls_past_max_streams(make_relay, fake):
    rs = make_relay(upstream=fake.url, max_streams=3)
    fake.script = first_token_then_hang()
    created = [(await post_session(rs)).json() for _ in range(3)]
    refused = await post_session(rs)
    assert refused.status == 503 and refused.json()["error"]["code"] == "at_capacity"
    assert refused.headers["retry-after"] == "1"
    one_shot = await fetch_stream(rs.url + "/aianswer/streamAsk", ASK)
    assert one_shot.status == 503
    await eventually(lambda: len(fake.requests) == 3)
    # An admitted session's reader takes its call's slot: never refused.
    readers = [await raw_get(rs_port(rs), c["streamUrl"]) for c in created]
    for reader in readers:
        assert (await reader.read_until(b"id: 1\n")).startswith(b"HTTP/1.1 200 ")
    # A second reader of the same answer needs a slot of its own.
    second = await fetch_stream(rs.url + created[0]["streamUrl"])
    assert second.status == 503
    assert rs.relay.store.ledger.slots == 3
    for reader in readers:
        reader.close()
    metrics = (await fetch_stream(rs.url + "/metrics")).raw.decode()
    assert 'relay_refused_total{code="at_capacity"} 3.0' in metrics
    assert "relay_slots_in_use 3.0" in metrics and "relay_running_answers 3.0" in metrics
    assert len(fake.requests) == 3


def rs_port(rs) -> int:
    return int(rs.url.rsplit(":", 1)[1])


@pytest.mark.gen_test(timeout=30)
async def test_per_user_cap_on_concurrent_answers_is_429_too_many_answers(make_relay, fake):
    rs = make_relay(
        upstream=fake.url, auth_tokens={"ta": "alice", "tb": "bob"}, max_answers_per_user=2
    )
    fake.script = first_token_then_hang()
    alice, bob = {"Authorization": "Bearer ta"}, {"Authorization": "Bearer tb"}
    first = (await post_session(rs, alice)).json()
    assert (await post_session(rs, alice)).status == 201
    refused = await post_session(rs, alice)
    assert refused.status == 429 and refused.json()["error"]["code"] == "too_many_answers"
    assert refused.headers["retry-after"] == "1"
    assert (await fetch_stream(rs.url + "/aianswer/streamAsk", ASK, headers=alice)).status == 429
    assert (await post_session(rs, bob)).status == 201  # a cap per user
    # Reconnects do not count; an answer that ends gives its place back.
    reader = await raw_get(rs_port(rs), first["streamUrl"])
    assert (await reader.read_until(b"id: 1\n")).startswith(b"HTTP/1.1 200 ")
    reader.close()
    deleted = await fetch_stream(
        rs.url + "/aianswer/sessions/" + first["uid"], method="DELETE", headers=alice
    )
    assert deleted.status == 204
    assert (await post_session(rs, alice)).status == 201
    await eventually(lambda: len(fake.requests) == 4)


@pytest.mark.gen_test(timeout=30)
async def test_anonymous_cap_is_off_by_default_and_per_address_when_set(make_relay, fake):
    fake.script = first_token_then_hang()
    open_relay = make_relay(upstream=fake.url)
    for _ in range(10):
        assert (await post_session(open_relay)).status == 201
    capped = make_relay(upstream=fake.url, max_answers_per_address=2)
    for _ in range(2):
        assert (await post_session(capped)).status == 201
    refused = await post_session(capped)
    assert refused.status == 429 and refused.json()["error"]["code"] == "too_many_answers"


@pytest.mark.gen_test(timeout=30)
async def test_session_nobody_attaches_to_is_cancelled_after_attach_grace(make_relay, fake):
    # A session POST whose client never reads the uid (or never attaches) must not
    # keep a paid call running to its end.
    rs = make_relay(upstream=fake.url, attach_grace=0.5)
    fake.script = first_token_then_hang()
    lonely = (await post_session(rs)).json()
    read = (await post_session(rs)).json()
    reader = await raw_get(rs_port(rs), read["streamUrl"])
    await reader.read_until(b"id: 1\n")
    reader.close()  # attached once: it runs on with no reader, as the contract says
    await asyncio.wait_for(fake.disconnected.wait(), 3)
    assert len(fake.disconnects) == 1
    await asyncio.sleep(1.0)
    assert len(fake.disconnects) == 1 and len(rs.relay.upstream.calls) == 1
    late = await fetch_stream(rs.url + lonely["streamUrl"])
    assert late.events[-1].event == "error"
    assert json.loads(late.events[-1].data)["error"]["code"] == "not_attached"
    metrics = (await fetch_stream(rs.url + "/metrics")).raw.decode()
    assert "relay_sessions_not_attached_total 1.0" in metrics


@pytest.mark.gen_test(timeout=60)
async def test_finished_sessions_are_evicted_oldest_first_past_the_kept_bytes_bound(
    make_relay, fake
):
    rs = make_relay(upstream=fake.url, max_kept_mib=1)
    tokens = ["y" * 1000] * 300  # ~400 KB kept per session
    fake.script = send_frames([b"".join(answer_frames(tokens))])
    finished = []
    for _ in range(6):
        created = (await post_session(rs)).json()
        assert (await fetch_stream(rs.url + created["streamUrl"])).text() == "".join(tokens)
        finished.append(created)
    ledger = rs.relay.store.ledger
    assert ledger.kept_bytes <= 1 << 20
    statuses = [(await fetch_stream(rs.url + c["streamUrl"])).status for c in finished]
    assert statuses[-2:] == [200, 200] and statuses[0] == 404
    assert statuses == sorted(statuses, reverse=True)  # the oldest went first
    # A running session is never evicted, however large.
    fake.script = send_frames([b"".join(answer_frames(tokens * 4, finish=False))], then_hang=30)
    running = (await post_session(rs)).json()
    reader = await raw_get(rs_port(rs), running["streamUrl"], rcvbuf=1 << 20)
    await reader.read_until(b"id: 1200\n")
    assert rs.relay.store.find(running["uid"]) is not None
    assert all(rs.relay.store.find(c["uid"]) is None for c in finished)
    reader.close()
    metrics = (await fetch_stream(rs.url + "/metrics")).raw.decode()
    assert "relay_sessions_evicted_total 6.0" in metrics


@pytest.mark.gen_test(timeout=60)
async def test_finished_sessions_do_not_hold_memory_past_the_kept_bytes_bound(relay_process, fake):
    # Before: every finished session was kept whole until its TTL, with no cap
    # (1,500 answers of 2,000 tokens held 777 MB).
    tokens = ["z" * 1000] * 1500  # ~1.9 MB kept per session
    fake.script = send_frames([b"".join(answer_frames(tokens))])
    rp = await relay_process(f"--upstream={fake.url}", "--max-kept-mib=16")
    before = rp.rss_bytes()
    for _ in range(80):
        created = await create_session(rp)
        assert (await fetch_stream(rp.url + created["streamUrl"])).text() == "".join(tokens)
    grown = rp.rss_bytes() - before
    assert grown < 80 << 20, f"RSS grew {grown >> 20} MiB for 150 MB of finished answers"


# -- requests of clients that are gone, and bad text --------------------------------------


def pipelined(path: str, count: int) -> bytes:
    body = json.dumps(ASK).encode()
    one = (
        b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (path.encode(), len(body), body)
    )
    return one * count


@pytest.mark.parametrize("path", ["/aianswer/streamAsk", "/aianswer/sessions"])
@pytest.mark.gen_test(timeout=30)
async def test_pipelined_requests_on_a_connection_the_client_closed_open_no_upstream_call(
    make_relay, fake, path
):
    rs = make_relay(upstream=fake.url)
    fake.script = first_token_then_hang()
    sock = socket.create_connection(("127.0.0.1", rs_port(rs)))
    sock.sendall(pipelined(path, 50))
    sock.close()
    await asyncio.sleep(1.0)
    assert fake.requests == []
    await eventually(lambda: nothing_left(rs))


@pytest.mark.gen_test(timeout=30)
async def test_pipelined_answers_on_one_open_connection_run_one_at_a_time(make_relay, fake):
    rs = make_relay(upstream=fake.url)
    fake.script = send_frames(answer_frames(["a", "b"]), delay=0.2)
    stream = IOStream(socket.socket())
    await stream.connect(("127.0.0.1", rs_port(rs)))
    await stream.write(pipelined("/aianswer/streamAsk", 3))
    for answer in range(1, 4):
        await stream.read_until(b"id: 1\n")
        assert len(fake.requests) == answer  # the next one waits for this one's end
        await stream.read_until(b"0\r\n\r\n")
    stream.close()


@pytest.mark.parametrize("path", ["/aianswer/streamAsk", "/aianswer/sessions"])
@pytest.mark.parametrize(
    "body",
    [
        b'{"robotId": "1", "aiQuestion": "a\\ud800b"}',
        b'{"robotId": "1", "aiQuestion": "q", "aiQuestionHistory": [["\\udfff", "a"]]}',
    ],
)
@pytest.mark.gen_test
async def test_lone_surrogate_in_question_or_history_is_400_and_creates_nothing(
    relay, fake, path, body
):
    res = await fetch_stream(relay.url + path, body)
    assert res.status == 400 and res.json()["error"]["code"] == "bad_request"
    assert "surrogate" in res.json()["error"]["message"]
    assert fake.requests == [] and nothing_left(relay)
    assert relay.relay.store.ledger.slots == 0
