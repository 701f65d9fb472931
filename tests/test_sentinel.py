"""The store on a master with a replica behind three Sentinels (real processes on loopback,
``down-after-milliseconds`` 1000): relays follow the master the Sentinels name."""

from __future__ import annotations

import asyncio
import time

import pytest

from tests.conftest import create_session, fetch_stream
from tests.fakeupstream import gated, hang, stream_tokens
from tests.redisprocs import SentinelSet
from tests.streams import ANSWER_TOKENS as TOKENS
from tests.streams import ids, read_until_id, resume_through_503s


@pytest.fixture
def sentinels(tmp_path):
    group = SentinelSet(tmp_path)
    group.start()
    yield group
    group.stop()


@pytest.mark.gen_test(timeout=90)
async def test_sentinel_master_killed_mid_answer_relays_follow_the_new_master(
    relay_process, fake, sentinels
):
    a = await relay_process(f"--upstream={fake.url}", f"--store={sentinels.url}")
    b = await relay_process(f"--upstream={fake.url}", f"--store={sentinels.url}")
    fake.script = stream_tokens(TOKENS)
    created = await create_session(a)
    assert (await fetch_stream(b.url + created["streamUrl"])).text() == "".join(TOKENS)
    gate = asyncio.Event()
    fake.script = gated(TOKENS, 10, gate, delay=0.05)
    created = await create_session(a)
    follower = asyncio.ensure_future(fetch_stream(b.url + created["streamUrl"], timeout=60))
    await read_until_id(b, created["streamUrl"], 10)
    old = sentinels.master.port
    sentinels.master.kill()
    killed = time.monotonic()
    gate.set()
    res, window = await resume_through_503s(b.url + created["streamUrl"], 10, 20)
    assert res.status == 200 and window < 10
    assert ids(res) == list(range(11, len(TOKENS) + 3))  # resumed exactly
    assert res.text() == "".join(TOKENS[10:])
    whole = await follower
    assert ids(whole) == list(range(1, len(TOKENS) + 3))
    assert whole.text() == "".join(TOKENS)
    assert sentinels.master_port() == sentinels.replica.port != old
    # Both relays write to and read from the new master, and messages go through it.
    fake.script = hang(60)
    created = await create_session(b)
    res = await fetch_stream(f"{a.url}/aianswer/sessions/{created['uid']}", method="DELETE")
    assert res.status == 204
    await asyncio.wait_for(fake.disconnected.wait(), 5)
    assert time.monotonic() - killed < 30
    for rp in (a, b):
        assert (await fetch_stream(rp.url + created["streamUrl"])).status == 404
        assert (await fetch_stream(rp.url + "/readyz")).status == 200
