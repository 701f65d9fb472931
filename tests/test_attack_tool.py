"""The benchmark's attacker (relay.tools.attack) against a real relay: it attacks, and stops."""

from __future__ import annotations

import pytest

from relay.tools import attack
from tests.conftest import ASK, fetch_stream
from tests.processes import free_port


@pytest.mark.gen_test(timeout=30)
async def test_attacker_holds_slow_bodies_floods_sessions_and_stops_by_itself(make_relay, fake):
    rs = make_relay(upstream=fake.url, body_timeout=0.5, attach_grace=0.5)
    counts = await attack.run(rs.url, slow=20, posts_per_s=20, duration=2.0)
    assert counts["slow_opened"] > 20  # the relay closed them after --body-timeout: reopened
    assert counts["slow_closed_by_server"] >= 20
    assert 20 <= counts["session_post_201"] <= 45
    assert len(fake.requests) == counts["session_post_201"]
    res = await fetch_stream(rs.url + "/aianswer/streamAsk", ASK)
    assert res.text() == "Hello, world"


@pytest.mark.gen_test(timeout=10)
async def test_attacker_stops_on_time_when_nothing_listens():
    counts = await attack.run(f"http://127.0.0.1:{free_port()}", slow=2, posts_per_s=32, duration=1)
    assert counts["slow_connect_failed"] >= 2 and counts["flood_connect_failed"] >= 16
    assert set(counts) == {"slow_connect_failed", "flood_connect_failed"}
