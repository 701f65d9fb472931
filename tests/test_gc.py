"""A finished stream leaves no reference cycles behind.

The server turns CPython's automatic full collections off (one pass per
``--prune-interval`` instead), because with thousands of open streams each pass
stopped the loop for hundreds of milliseconds. That is only sound while ending
a stream frees everything by reference counting: these tests collect with
``DEBUG_SAVEALL`` and fail on any relay object that only a GC pass would free.
"""

from __future__ import annotations

import asyncio
import gc

import pytest

from relay.serve import NO_AUTOMATIC_FULL, full_collection, manual_full_collections
from tests.conftest import (
    ASK,
    create_session,
    cyclic_stream_garbage,
    eventually,
    fetch_stream,
    nothing_left,
)
from tests.fakeupstream import hang, status, stream_tokens
from tests.streams import open_raw_stream


@pytest.mark.gen_test(timeout=20)
async def test_completed_one_shot_stream_leaves_no_cycles(relay, fake, clean_gc):
    fake.script = stream_tokens(["你", "好"])
    for _ in range(3):
        res = await fetch_stream(relay.url + "/aianswer/streamAsk", ASK)
        assert res.text() == "你好"
    await eventually(lambda: nothing_left(relay))
    garbage = cyclic_stream_garbage()
    assert garbage == [], garbage


@pytest.mark.gen_test(timeout=20)
async def test_session_attached_with_get_leaves_no_cycles(relay, fake, clean_gc):
    fake.script = stream_tokens(["a", "b"])
    created = await create_session(relay)
    res = await fetch_stream(relay.url + created["streamUrl"])
    assert res.text() == "ab"
    await relay.relay.store.remove(created["uid"])
    await eventually(lambda: nothing_left(relay))
    garbage = cyclic_stream_garbage()
    assert garbage == [], garbage


@pytest.mark.gen_test(timeout=20)
async def test_upstream_error_leaves_no_cycles(relay, fake, clean_gc):
    fake.script = status(500)
    stream = await open_raw_stream(relay)  # Tornado's client would leave a cycle of its own
    assert (await stream.read_until(b"\r\n\r\n")).startswith(b"HTTP/1.1 502 ")
    stream.close()
    await eventually(lambda: nothing_left(relay))
    garbage = cyclic_stream_garbage()
    assert garbage == [], garbage


@pytest.mark.gen_test(timeout=20)
async def test_client_leaving_mid_answer_leaves_no_cycles(relay, fake, clean_gc):
    fake.script = hang(30)
    stream = await open_raw_stream(relay)
    await eventually(lambda: fake.requests)
    stream.close()
    await asyncio.wait_for(fake.disconnected.wait(), 2)
    await eventually(lambda: nothing_left(relay))
    garbage = cyclic_stream_garbage()
    assert garbage == [], garbage


def test_manual_full_collections_policy():
    before = gc.get_threshold()
    try:
        manual_full_collections()
        assert gc.get_threshold()[2] == NO_AUTOMATIC_FULL
        assert gc.get_freeze_count() > 0
        cycle: list = []
        cycle.append(cycle)
        del cycle
        assert full_collection() >= 1  # the manual pass still finds real cycles
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
