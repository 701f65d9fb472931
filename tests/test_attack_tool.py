"""The benchmark's attacker (relay.tools.attack) against a real relay: it attacks, and stops."""

from __future__ import annotations

import pytest

from relay.tools import attack
from tests.conftest import ASK, fetch_stream


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
