"""Idempotent one-shot streams: POST /aianswer/streamAsk with an Idempotency-Key.

Real relays and the fake upstream on loopback; client streams are parsed with
`relay.sse.SSEParser` (never by matching the framing's bytes).
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import time

import pytest

from relay.errors import RelayError
from relay.idempotency import Entry, KeyedAsk, MemoryIndex, find_or_start, parse_key
from relay.resume import Graces
from relay.sessions import Session, SessionLimits
from relay.sse import ServerSentEvent
from tests.conftest import ASK, cyclic_stream_garbage, eventually, fetch_stream
from tests.fakeupstream import gated, status, stream_tokens
from tests.streams import BODY, KEY, RawStream, error_code, keyed

TOKENS = [f"段{i} " for i in range(12)]


def text(events: list[ServerSentEvent]) -> str:
    out = []
    for e in events:
        if e.event == "message" and e.data != "[DONE]":
            for choice in json.loads(e.data)["choices"]:
                out.append(choice["delta"].get("content") or "")
    return "".join(out)


def ids(events: list[ServerSentEvent]) -> list[int]:
    return [int(e.id) for e in events if e.event == "message"]


# -- the header -----------------------------------------------------------------


@pytest.mark.parametrize(
    "value, key",
    [
        ("0123456789abcdef", "0123456789abcdef"),  # 16: the shortest
        ("x" * 128, "x" * 128),
        ("550e8400-e29b-41d4-a716-446655440000", "550e8400-e29b-41d4-a716-446655440000"),
        ('"550e8400-e29b-41d4-a716"', "550e8400-e29b-41d4-a716"),  # an sf-string: unquoted
        ('"a\\"b\\\\c-0123456789"', 'a"b\\c-0123456789'),  # with its escapes
        ('!#$%&()*+,-./:;<=>?@[]^_`{|}~"', '!#$%&()*+,-./:;<=>?@[]^_`{|}~"'),
    ],
)
def test_idempotency_key_values_that_are_accepted(value, key):
    assert parse_key([value]) == key


def test_no_idempotency_key_header_is_none():
    assert parse_key([]) is None


BAD_KEYS = [
    "",
    "0123456789abcde",  # 15
    "x" * 129,
    "0123456789 abcdef",  # a space is not visible
    "0123456789\tabcdef",
    "0123456789abcdefé",  # not ASCII
    '"0123456789abcdef ghi"',  # an sf-string, but its key has a space
    '"short"',
]


@pytest.mark.parametrize("value", BAD_KEYS)
def test_idempotency_key_values_that_are_refused(value):
    with pytest.raises(RelayError) as caught:
        parse_key([value])
    assert caught.value.status == 400 and caught.value.code == "bad_request"
    assert "Idempotency-Key" in caught.value.message


def test_two_idempotency_key_headers_are_refused():
    with pytest.raises(RelayError) as caught:
        parse_key([KEY, KEY])
    assert caught.value.status == 400 and "one Idempotency-Key" in caught.value.message


@pytest.mark.gen_test
@pytest.mark.parametrize("value", [v for v in BAD_KEYS if v.isascii() and "\t" not in v] + [2])
async def test_bad_idempotency_keys_are_400_and_start_nothing(relay, fake, value):
    if value == 2:  # two headers
        raw = await RawStream.open(relay.url, KEY, headers={"Idempotency-Key": KEY + "x"})
    else:
        raw = await RawStream.open(relay.url, value)
    await raw.to_end()
    raw.close()
    assert raw.head.status == 400
    assert json.loads(raw.body)["error"]["code"] == "bad_request"
    assert len(fake.requests) == 0 and len(relay.relay.store) == 0
    assert "x-relay-session" not in raw.head.headers


@pytest.mark.gen_test
async def test_bad_key_answer_says_why_and_never_echoes_the_key(relay, fake):
    bad = "secret-but-short"[:15]
    res = await fetch_stream(relay.url + "/aianswer/streamAsk", ASK, headers=keyed(bad))
    assert res.status == 400
    assert res.json()["error"]["code"] == "bad_request"
    assert "16 to 128 visible ASCII" in res.json()["error"]["message"]
    assert bad.encode() not in res.raw


# -- same key, same body: one answer --------------------------------------------


@pytest.mark.gen_test(timeout=20)
async def test_same_key_twice_is_one_upstream_call_and_continues_after_last_event_id(relay, fake):
    gate = asyncio.Event()
    fake.script = gated(TOKENS, 5, gate)
    first = await RawStream.open(relay.url)
    await first.until_id(5)
    uid = first.head.headers["x-relay-session"]
    assert len(uid) == 32
    first.close()  # a network error: the client retries with the same key
    gate.set()
    res = await fetch_stream(
        relay.url + "/aianswer/streamAsk", ASK, headers=keyed(**{"Last-Event-ID": "5"})
    )
    assert res.status == 200 and res.headers["x-relay-session"] == uid
    assert ids(res.events) == list(range(6, len(TOKENS) + 3))  # no gap, no duplicate
    assert text(first.events[:5]) + res.text() == "".join(TOKENS)
    assert res.data[-1] == "[DONE]"
    assert len(fake.requests) == 1


@pytest.mark.gen_test(timeout=20)
async def test_repeat_without_last_event_id_replays_the_whole_answer(relay, fake):
    fake.script = stream_tokens(TOKENS)
    url = relay.url + "/aianswer/streamAsk"
    one = await fetch_stream(url, ASK, headers=keyed())
    two = await fetch_stream(url, ASK, headers=keyed())
    assert one.text() == two.text() == "".join(TOKENS)
    assert one.data == two.data  # the same answer, byte for byte (its business node too)
    assert one.headers["x-relay-session"] == two.headers["x-relay-session"]
    assert len(fake.requests) == 1
    assert len(relay.relay.store) == 1  # kept for the session TTL


@pytest.mark.gen_test(timeout=20)
async def test_repeat_at_the_last_event_is_200_with_a_stream_that_ends_at_once(relay, fake):
    fake.script = stream_tokens(TOKENS)
    url = relay.url + "/aianswer/streamAsk"
    done = await fetch_stream(url, ASK, headers=keyed())
    last = done.events[-1].id
    res = await fetch_stream(url, ASK, headers=keyed(**{"Last-Event-ID": last}))
    assert res.status == 200  # not 204: fetch-event-source retries on a 204
    assert res.headers["content-type"].startswith("text/event-stream")
    assert res.headers["x-relay-session"] == done.headers["x-relay-session"]
    assert res.events == []
    assert len(fake.requests) == 1


@pytest.mark.gen_test(timeout=20)
async def test_repeat_with_a_last_event_id_that_names_no_event_is_bad_last_event_id(relay, fake):
    fake.script = stream_tokens(TOKENS)
    url = relay.url + "/aianswer/streamAsk"
    await fetch_stream(url, ASK, headers=keyed())
    for bad in ("99", "-1", "x"):
        res = await fetch_stream(url, ASK, headers=keyed(**{"Last-Event-ID": bad}))
        assert res.status == 200
        assert [error_code(e) for e in res.events] == ["bad_last_event_id"]
    assert len(fake.requests) == 1


@pytest.mark.gen_test(timeout=20)
async def test_same_key_with_another_body_is_422_and_no_upstream_call(relay, fake):
    fake.script = stream_tokens(TOKENS)
    url = relay.url + "/aianswer/streamAsk"
    await fetch_stream(url, BODY, headers=keyed())
    other = {**ASK, "aiQuestion": "另一个问题"}
    spaced = BODY.replace(b",", b", ")  # the same JSON, other bytes: another body
    for body in (other, spaced):
        res = await fetch_stream(url, body, headers=keyed())
        assert res.status == 422
        assert res.json()["error"]["code"] == "idempotency_key_reused"
        assert "x-relay-session" not in res.headers
        assert KEY.encode() not in res.raw
    assert len(fake.requests) == 1


@pytest.mark.gen_test(timeout=20)
async def test_repeat_takes_the_answer_over_and_the_older_connection_is_closed(relay, fake):
    gate = asyncio.Event()
    fake.script = gated(TOKENS, 3, gate)
    first = await RawStream.open(relay.url)
    await first.until_id(3)
    second = await RawStream.open(relay.url, headers={"Last-Event-ID": "3"})
    rest = await first.to_end()  # ends, and the relay closes the connection
    assert error_code(rest[-1]) == "taken_over"
    assert ids(rest) == [1, 2, 3]
    # Nothing more on that connection: the relay closes it.
    assert await asyncio.wait_for(first.stream.read_until_close(), 5) == b""
    gate.set()
    events = await second.to_end()
    second.close()
    assert second.head.headers["x-relay-session"] == first.head.headers["x-relay-session"]
    assert ids(events) == list(range(4, len(TOKENS) + 3))
    assert len(fake.requests) == 1


@pytest.mark.gen_test(timeout=20)
async def test_a_taken_over_stream_that_reads_nothing_is_closed_at_once(relay, fake):
    # Past the 4 MiB a loopback send buffer may grow to, and under the 8 MiB a session keeps.
    big = [f"{i:05d}" + "x" * 1500 for i in range(3500)]
    gate = asyncio.Event()
    fake.script = gated(big, len(big), gate)
    first = await RawStream.open(relay.url, rcvbuf=4096)  # and never read
    handler = await _keyed_stream(relay)
    await eventually(lambda: handler._writer is not None and handler._writer.blocked, 10)
    second = await RawStream.open(relay.url, headers={"Last-Event-ID": "1"})
    await second.until_id(2)
    await eventually(lambda: handler not in relay.relay.streams)
    gate.set()
    events = await second.to_end()
    first.close()
    second.close()
    assert ids(events)[-1] == len(big) + 2
    assert len(fake.requests) == 1


async def _keyed_stream(rs):
    await eventually(lambda: rs.relay.streams)
    return next(iter(rs.relay.streams))


@pytest.mark.gen_test(timeout=20)
async def test_repeat_before_the_first_event_gets_the_answer_when_it_comes(relay, fake):
    gate = asyncio.Event()
    fake.script = gated(TOKENS, 0, gate)
    first = await RawStream.open(relay.url)
    await eventually(lambda: len(fake.requests) == 1)
    second = asyncio.ensure_future(
        fetch_stream(relay.url + "/aianswer/streamAsk", ASK, headers=keyed())
    )
    await asyncio.sleep(0.2)
    gate.set()
    res = await second
    events = await first.to_end()
    first.close()
    assert res.text() == "".join(TOKENS)
    # The first had sent nothing: taken over, it gets only the error.
    assert [error_code(e) for e in events] == ["taken_over"]
    assert len(fake.requests) == 1


# -- failed answers ---------------------------------------------------------------


@pytest.mark.gen_test(timeout=20)
async def test_repeat_of_a_failed_answer_replays_what_is_kept_and_its_error(relay, fake):
    fake.script = stream_tokens(TOKENS[:4], finish=False)  # cut: upstream_closed
    url = relay.url + "/aianswer/streamAsk"
    one = await fetch_stream(url, ASK, headers=keyed())
    assert one.text() == "".join(TOKENS[:4]) and error_code(one.events[-1]) == "upstream_closed"
    two = await fetch_stream(url, ASK, headers=keyed())
    assert two.events == one.events
    # Having seen every event, it still learns how the answer ended.
    three = await fetch_stream(url, ASK, headers=keyed(**{"Last-Event-ID": "4"}))
    assert three.status == 200 and [error_code(e) for e in three.events] == ["upstream_closed"]
    assert len(fake.requests) == 1


@pytest.mark.gen_test(timeout=20)
async def test_repeat_of_an_answer_that_failed_before_its_first_event_is_the_same_error(
    relay, fake
):
    fake.script = status(500, "model exploded")
    url = relay.url + "/aianswer/streamAsk"
    one = await fetch_stream(url, ASK, headers=keyed())
    two = await fetch_stream(url, ASK, headers=keyed())
    assert one.status == two.status == 502
    assert one.json() == two.json() and "model exploded" in one.json()["error"]["message"]
    assert one.headers["x-relay-session"] == two.headers["x-relay-session"]
    assert len(fake.requests) == 1


# -- disconnects and the resume grace ---------------------------------------------


@pytest.mark.gen_test(timeout=20)
async def test_disconnect_and_repeat_within_the_grace_does_not_cancel(make_relay, fake):
    rs = make_relay(upstream=fake.url, resume_grace=0.5)
    gate = asyncio.Event()
    fake.script = gated(TOKENS, 4, gate)
    first = await RawStream.open(rs.url)
    await first.until_id(4)
    first.close()
    await eventually(lambda: len(rs.relay.graces) == 1)  # the relay saw it leave
    await asyncio.sleep(0.2)
    second = asyncio.ensure_future(
        fetch_stream(rs.url + "/aianswer/streamAsk", ASK, headers=keyed(**{"Last-Event-ID": "4"}))
    )
    await asyncio.sleep(1.0)  # past the grace of the first stream, with the second reading
    assert not fake.disconnected.is_set()
    gate.set()
    res = await second
    assert ids(res.events) == list(range(5, len(TOKENS) + 3))
    assert res.data[-1] == "[DONE]"
    assert len(fake.requests) == 1 and not fake.disconnected.is_set()


@pytest.mark.gen_test(timeout=20)
async def test_disconnect_without_repeat_cancels_upstream_after_the_grace(make_relay, fake):
    rs = make_relay(upstream=fake.url, resume_grace=0.5)
    fake.script = gated(TOKENS, 3, asyncio.Event(), finish=False)  # then nothing
    first = await RawStream.open(rs.url)
    await first.until_id(3)
    first.close()
    left = time.monotonic()
    await asyncio.sleep(0.3)
    assert not fake.disconnected.is_set()  # still within the grace
    await asyncio.wait_for(fake.disconnected.wait(), 3)
    assert time.monotonic() - left >= 0.45
    # A late repeat replays what is kept, then how it ended.
    res = await fetch_stream(rs.url + "/aianswer/streamAsk", ASK, headers=keyed())
    assert ids(res.events) == [1, 2, 3]
    assert error_code(res.events[-1]) == "not_attached"
    assert len(fake.requests) == 1


@pytest.mark.gen_test(timeout=20)
async def test_disconnect_before_the_first_event_gets_the_grace_too(make_relay, fake):
    rs = make_relay(upstream=fake.url, resume_grace=0.5)
    fake.script = gated(TOKENS, 0, asyncio.Event(), finish=False)
    raw = await RawStream.open(rs.url)
    await eventually(lambda: len(fake.requests) == 1)
    raw.close()  # before any event: the response has not even begun
    await asyncio.sleep(0.25)
    assert not fake.disconnected.is_set()
    await asyncio.wait_for(fake.disconnected.wait(), 3)


@pytest.mark.gen_test(timeout=20)
async def test_delete_of_the_x_relay_session_cancels_and_forgets_the_key(relay, fake):
    fake.script = gated(TOKENS, 3, asyncio.Event(), finish=False)
    raw = await RawStream.open(relay.url)
    await raw.until_id(3)
    uid = raw.head.headers["x-relay-session"]
    res = await fetch_stream(relay.url + f"/aianswer/sessions/{uid}", method="DELETE")
    assert res.status == 204
    await asyncio.wait_for(fake.disconnected.wait(), 2)
    events = await raw.to_end()
    raw.close()
    assert error_code(events[-1]) == "cancelled"
    assert len(relay.relay.store) == 0 and len(relay.relay.store.index) == 0
    # The key went with its session: the same key is a new answer now.
    fake.script = stream_tokens(TOKENS)
    res = await fetch_stream(relay.url + "/aianswer/streamAsk", ASK, headers=keyed())
    assert res.text() == "".join(TOKENS) and res.headers["x-relay-session"] != uid
    assert len(fake.requests) == 2


@pytest.mark.gen_test(timeout=20)
async def test_delete_by_another_user_is_404_and_the_key_is_scoped_by_user(make_relay, fake):
    rs = make_relay(upstream=fake.url, auth_tokens={"tok-a": "alice", "tok-b": "bob"})
    fake.script = stream_tokens(TOKENS)
    url = rs.url + "/aianswer/streamAsk"
    alice = keyed(Authorization="Bearer tok-a")
    bob = keyed(Authorization="Bearer tok-b")
    one = await fetch_stream(url, ASK, headers=alice)
    two = await fetch_stream(url, ASK, headers=bob)  # the same key, another user
    assert one.headers["x-relay-session"] != two.headers["x-relay-session"]
    assert len(fake.requests) == 2
    uid = one.headers["x-relay-session"]
    res = await fetch_stream(rs.url + f"/aianswer/sessions/{uid}", method="DELETE", headers=bob)
    assert res.status == 404
    res = await fetch_stream(rs.url + f"/aianswer/sessions/{uid}", method="DELETE", headers=alice)
    assert res.status == 204


@pytest.mark.gen_test(timeout=20)
async def test_anonymous_keys_from_two_addresses_do_not_collide(relay, fake):
    fake.script = stream_tokens(TOKENS)
    results = []
    for source in ("127.0.0.1", "127.0.0.2", "127.0.0.2"):
        raw = await RawStream.open(relay.url, source=source)
        await raw.to_end()
        raw.close()
        results.append((raw.head, raw.events))
    uids = [head.headers["x-relay-session"] for head, _ in results]
    assert uids[0] != uids[1] and uids[1] == uids[2]
    assert all(text(events) == "".join(TOKENS) for _, events in results)
    assert len(fake.requests) == 2


# -- admission, headers, logs ---------------------------------------------------


@pytest.mark.gen_test(timeout=20)
async def test_a_repeat_is_a_reader_not_a_new_answer(make_relay, fake):
    rs = make_relay(upstream=fake.url, rate_limit=1, max_answers_per_address=1)
    gate = asyncio.Event()
    fake.script = gated(TOKENS, 2, gate)
    url = rs.url + "/aianswer/streamAsk"
    first = await RawStream.open(rs.url)
    await first.until_id(2)
    # A new answer would pass neither the rate limit nor the per-address cap; a repeat may.
    refused = await fetch_stream(url, ASK, headers=keyed(KEY + "-other"))
    assert refused.status == 429 and "x-relay-session" not in refused.headers
    assert len(rs.relay.store.index) == 1  # the refused key claimed nothing
    repeat = asyncio.ensure_future(fetch_stream(url, ASK, headers=keyed()))
    await first.to_end()
    first.close()
    gate.set()
    res = await repeat
    assert res.status == 200 and res.text() == "".join(TOKENS)
    assert len(fake.requests) == 1


@pytest.mark.gen_test(timeout=20)
async def test_keyed_responses_expose_x_relay_session_to_cors_clients(make_relay, fake):
    origin = "https://app.example"
    rs = make_relay(upstream=fake.url, cors_origins=(origin,))
    fake.script = stream_tokens(TOKENS)
    url = rs.url + "/aianswer/streamAsk"
    res = await fetch_stream(url, ASK, headers=keyed(Origin=origin))
    assert "X-Relay-Session" in res.headers["access-control-expose-headers"]
    assert len(res.headers["x-relay-session"]) == 32
    pre = await fetch_stream(url, method="OPTIONS", headers={"Origin": origin})
    assert "Idempotency-Key" in pre.headers["access-control-allow-headers"]


@pytest.mark.gen_test(timeout=20)
async def test_without_a_key_nothing_changes(relay, fake):
    fake.script = stream_tokens(TOKENS)
    res = await fetch_stream(relay.url + "/aianswer/streamAsk", ASK)
    assert res.text() == "".join(TOKENS) and "x-relay-session" not in res.headers
    await eventually(lambda: len(relay.relay.store) == 0)
    assert len(relay.relay.store.index) == 0


async def taken_over(relay, fake) -> str:
    """A keyed answer taken over by a repeat after event 2, both streams read to their end."""
    gate = asyncio.Event()
    fake.script = gated(TOKENS, 2, gate)
    first = await RawStream.open(relay.url)
    await first.until_id(2)
    second = await RawStream.open(relay.url, headers={"Last-Event-ID": "2"})
    await first.to_end()
    first.close()
    gate.set()
    await second.to_end()
    second.close()
    return second.head.headers["x-relay-session"]


@pytest.mark.gen_test(timeout=20)
async def test_keys_and_whole_uids_never_reach_the_logs(relay, fake, caplog):
    caplog.set_level(logging.DEBUG)
    uid = await taken_over(relay, fake)
    await fetch_stream(relay.url + "/aianswer/streamAsk", {"aiQuestion": "x"}, headers=keyed())
    await fetch_stream(relay.url + f"/aianswer/sessions/{uid}", method="DELETE")
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert uid[:8] in logged and "taken_over" in logged
    assert KEY not in logged and uid not in logged


@pytest.mark.gen_test(timeout=20)
async def test_keyed_streams_leave_no_cycles(make_relay, fake, clean_gc):
    relay = make_relay(upstream=fake.url, resume_grace=0.1)
    uid = await taken_over(relay, fake)
    url = relay.url + "/aianswer/streamAsk"
    assert (await fetch_stream(url, {"aiQuestion": "x"}, headers=keyed())).status == 422
    assert (await fetch_stream(url, ASK, headers=keyed("bad"))).status == 400
    await fetch_stream(relay.url + f"/aianswer/sessions/{uid}", method="DELETE")
    fake.script = gated(TOKENS, 1, asyncio.Event(), finish=False)
    abandoned = await RawStream.open(relay.url)  # then left: cancelled after the grace
    await abandoned.until_id(1)
    abandoned.close()
    await asyncio.wait_for(fake.disconnected.wait(), 3)
    await relay.relay.store.remove(abandoned.head.headers["x-relay-session"])
    await eventually(
        lambda: not (relay.relay.streams or len(relay.relay.readers) or len(relay.relay.graces))
    )
    assert len(relay.relay.store) == 0 and not relay.relay.upstream.calls
    garbage = cyclic_stream_garbage()
    assert garbage == [], garbage


# -- find_or_start, against a store that loses races ----------------------------


class RacyStore:
    """A store whose claims are lost to ``winners`` (uids, claimed by someone else)."""

    def __init__(self, winners: list[str | None], live: set[str]) -> None:
        self.index = MemoryIndex()
        self.winners = winners
        self.live = live
        self.removed: list[str] = []

    async def keyed(self, index: str) -> Entry | None:
        return None

    async def claim(self, ask: KeyedAsk, uid: str, reader: str, stale: str = "") -> Entry | None:
        winner = self.winners.pop(0)
        return None if winner is None else Entry(winner, ask.body)

    async def get(self, uid: str) -> Session | None:
        return session(uid) if uid in self.live else None

    async def remove(self, uid: str) -> None:
        self.removed.append(uid)


def session(uid: str) -> Session:
    return Session(uid, "anonymous", "1", True, SessionLimits())


ASKED = KeyedAsk.of("addr:127.0.0.1", KEY, BODY)


@pytest.mark.gen_test
async def test_a_claim_lost_to_a_concurrent_request_reads_the_winner_and_drops_its_own():
    store = RacyStore(["winner"], {"winner"})
    found, new = await find_or_start(store, ASKED, "t", lambda: _created("mine"))
    assert (found.uid, new) == ("winner", False)
    assert store.removed == ["mine"]


@pytest.mark.gen_test
async def test_a_key_contended_past_every_round_is_503_and_drops_its_own():
    store = RacyStore(["gone1", "gone2", "gone3"], set())
    with pytest.raises(RelayError) as caught:
        await find_or_start(store, ASKED, "t", lambda: _created("mine"))
    assert caught.value.status == 503
    assert store.removed == ["mine"]


@pytest.mark.gen_test
async def test_an_entry_whose_session_is_gone_is_replaced():
    index = MemoryIndex()
    assert index.claim(ASKED, "old") is None
    assert index.claim(ASKED, "new") == Entry("old", ASKED.body)
    assert index.claim(ASKED, "new", stale="old") is None
    assert index.get(ASKED.index) == Entry("new", ASKED.body)
    index.release(ASKED.index, "old")  # not its entry any more
    assert len(index) == 1
    index.release(ASKED.index, "new")
    assert len(index) == 0


async def _created(uid: str) -> Session:
    return session(uid)


# -- more failure paths -------------------------------------------------------------


@pytest.mark.gen_test(timeout=20)
async def test_a_repeat_refused_at_capacity_is_503_and_names_the_session(make_relay, fake):
    rs = make_relay(upstream=fake.url, max_streams=1)
    gate = asyncio.Event()
    fake.script = gated(TOKENS, 2, gate)
    first = await RawStream.open(rs.url)
    await first.until_id(2)
    res = await fetch_stream(rs.url + "/aianswer/streamAsk", ASK, headers=keyed())
    assert res.status == 503 and res.json()["error"]["code"] == "at_capacity"
    assert res.headers["retry-after"] == "1"
    assert res.headers["x-relay-session"] == first.head.headers["x-relay-session"]
    gate.set()
    assert text(await first.to_end()) == "".join(TOKENS)  # the first reader is untouched
    first.close()
    assert len(fake.requests) == 1


@pytest.mark.gen_test(timeout=20)
async def test_an_expired_keyed_answer_frees_its_key(make_relay, fake):
    rs = make_relay(upstream=fake.url, session_ttl=0.3)
    fake.script = stream_tokens(TOKENS)
    url = rs.url + "/aianswer/streamAsk"
    one = await fetch_stream(url, ASK, headers=keyed())
    await asyncio.sleep(0.5)
    two = await fetch_stream(url, ASK, headers=keyed())
    assert two.text() == "".join(TOKENS)
    assert one.headers["x-relay-session"] != two.headers["x-relay-session"]
    assert len(fake.requests) == 2 and len(rs.relay.store.index) == 1


@pytest.mark.gen_test(timeout=20)
async def test_pipelined_keyed_requests_of_a_client_that_left_start_nothing(make_relay, fake):
    rs = make_relay(upstream=fake.url)
    fake.script = gated(TOKENS, 1, asyncio.Event(), finish=False)
    requests = b""
    for i in range(20):
        requests += (
            b"POST /aianswer/streamAsk HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Idempotency-Key: %s-%d\r\nContent-Length: %d\r\n\r\n%s"
            % (KEY.encode(), i, len(BODY), BODY)
        )
    sock = socket.create_connection(("127.0.0.1", int(rs.url.rsplit(":", 1)[1])))
    sock.sendall(requests)
    sock.close()
    await asyncio.sleep(1.0)
    assert fake.requests == []
    await eventually(lambda: len(rs.relay.store) == 0 and not rs.relay.streams)
    assert len(rs.relay.store.index) == 0


# -- the grace timer, against a store that says who reads ----------------------------


class Baton:
    """A store for `Graces`: ``reader`` is the latest keyed reader's token."""

    def __init__(self, reader: str) -> None:
        self.reader = reader
        self.abandoned: list[str] = []

    async def is_reader(self, session: Session, reader: str) -> bool:
        return self.reader == reader

    async def abandon(self, session: Session) -> None:
        self.abandoned.append(session.uid)


@pytest.mark.gen_test
@pytest.mark.parametrize("case", ["left", "taken_over", "read_here", "ended"])
async def test_the_grace_cancels_only_an_answer_nobody_came_back_for(case):
    store = Baton("t1" if case != "taken_over" else "t2")
    answer = session("a" * 32)
    if case == "read_here":
        answer.subscribe(object(), 0)  # a GET reader on this process
    elif case == "ended":
        answer.finish()
    graces = Graces(store, 0.05)
    graces.start(answer, "t1")
    await asyncio.sleep(0.2)
    assert store.abandoned == (["a" * 32] if case == "left" else [])
    assert len(graces) == 0
