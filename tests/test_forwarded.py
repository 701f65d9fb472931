"""The client's address behind trusted proxies (relay/forwarded.py, ``--trusted-proxies``)."""

from __future__ import annotations

import logging

import pytest
from tornado.httputil import HTTPHeaders

from relay.config import ConfigError, load_settings
from relay.forwarded import ClientAddress, parse_networks
from tests.conftest import ASK, fetch_stream
from tests.fakeupstream import stream_tokens

TRUSTED = ClientAddress(parse_networks(["10.0.0.0/8", "fd00::/8", "127.0.0.1"]))


def headers(*pairs: tuple[str, str]) -> HTTPHeaders:
    h = HTTPHeaders()
    for name, value in pairs:
        h.add(name, value)
    return h


@pytest.mark.parametrize(
    ("peer", "pairs", "client"),
    [
        # No header: the peer.
        ("10.0.0.5", [], "10.0.0.5"),
        # One proxy: the address it appended.
        ("10.0.0.5", [("X-Forwarded-For", "203.0.113.7")], "203.0.113.7"),
        # The client's own claim, left of it, is ignored; trusted hops are walked past.
        ("10.0.0.5", [("X-Forwarded-For", "1.2.3.4, 203.0.113.7, 10.0.0.9")], "203.0.113.7"),
        # Header lines are joined in order.
        (
            "10.0.0.5",
            [("X-Forwarded-For", "1.2.3.4"), ("X-Forwarded-For", "198.51.100.2")],
            "198.51.100.2",
        ),
        # Every hop trusted: the leftmost.
        ("10.0.0.5", [("X-Forwarded-For", "10.1.1.1, 10.2.2.2")], "10.1.1.1"),
        # Garbage where a trusted proxy would have written an address: the last one vouched for.
        ("10.0.0.5", [("X-Forwarded-For", "unknown, 10.2.2.2")], "10.2.2.2"),
        ("10.0.0.5", [("X-Forwarded-For", "bogus")], "10.0.0.5"),
        # Ports and brackets as some balancers write them; v4-mapped v6 is the v4 client.
        ("10.0.0.5", [("X-Forwarded-For", "203.0.113.7:5555")], "203.0.113.7"),
        ("10.0.0.5", [("X-Forwarded-For", "[2001:db8::1]:443")], "2001:db8::1"),
        ("::ffff:10.0.0.5", [("X-Forwarded-For", "::ffff:203.0.113.7")], "203.0.113.7"),
        ("fd00::1", [("X-Forwarded-For", "2001:db8::2")], "2001:db8::2"),
        # X-Real-IP only where there is no X-Forwarded-For.
        ("10.0.0.5", [("X-Real-IP", "203.0.113.8")], "203.0.113.8"),
        (
            "10.0.0.5",
            [("X-Real-IP", "203.0.113.8"), ("X-Forwarded-For", "198.51.100.2")],
            "198.51.100.2",
        ),
        ("10.0.0.5", [("X-Real-IP", "nonsense")], "10.0.0.5"),
        # An untrusted peer's headers change nothing.
        ("192.0.2.1", [("X-Forwarded-For", "203.0.113.7")], "192.0.2.1"),
        ("192.0.2.1", [("X-Real-IP", "203.0.113.7")], "192.0.2.1"),
    ],
)
def test_client_address(peer: str, pairs: list[tuple[str, str]], client: str) -> None:
    assert TRUSTED(peer, headers(*pairs)) == client


def test_no_trusted_proxies_means_the_peer_always() -> None:
    none = ClientAddress(())
    assert none("10.0.0.5", headers(("X-Forwarded-For", "203.0.113.7"))) == "10.0.0.5"


def test_a_bad_cidr_is_a_config_error_naming_it() -> None:
    with pytest.raises(
        ConfigError, match="--trusted-proxies: not an address or CIDR: '10.0.0.0/33'"
    ):
        load_settings(["--trusted-proxies=127.0.0.1,10.0.0.0/33"], environ={})
    assert load_settings(
        ["--trusted-proxies=127.0.0.1, 10.0.0.0/8"], environ={}
    ).trusted_proxies == (
        "127.0.0.1",
        "10.0.0.0/8",
    )


async def _four_streams(url: str, forwarded: list[str]) -> list[int]:
    statuses = []
    for client in forwarded:
        res = await fetch_stream(
            url + "/aianswer/streamAsk", ASK, headers={"X-Forwarded-For": client}
        )
        statuses.append(res.status)
    return statuses


@pytest.mark.gen_test
async def test_rate_limit_counts_forwarded_clients_apart(make_relay, fake, caplog) -> None:
    fake.script = stream_tokens(["a"])
    rs = make_relay(upstream=fake.url, rate_limit=1, trusted_proxies=("127.0.0.0/8",))
    caplog.set_level(logging.INFO)
    statuses = await _four_streams(
        rs.url, ["203.0.113.1", "203.0.113.2", "203.0.113.1", "203.0.113.3"]
    )
    assert statuses == [200, 200, 429, 200]
    # The logs name the forwarded client, not the proxy.
    lines = [r.getMessage() for r in caplog.records if "/v1/" not in r.getMessage()]
    assert any("client=203.0.113.2 " in line for line in lines), lines  # stream end lines
    assert any("(203.0.113.1)" in line for line in lines), lines  # the 429's access line
    assert not any("127.0.0.1" in line for line in lines), lines


@pytest.mark.gen_test
async def test_an_untrusted_peers_forwarded_for_changes_nothing(make_relay, fake) -> None:
    fake.script = stream_tokens(["a"])
    rs = make_relay(upstream=fake.url, rate_limit=1, trusted_proxies=("10.0.0.0/8",))
    statuses = await _four_streams(rs.url, ["203.0.113.1", "203.0.113.2"])
    assert statuses == [200, 429]  # both are 127.0.0.1, whatever they claim
