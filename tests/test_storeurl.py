"""``--store`` URLs (relay/storeurl.py), and stores whose Redis is not there at all."""

from __future__ import annotations

import time

import pytest

from relay.config import ConfigError, load_settings
from relay.errors import RelayError
from relay.redis_store import RedisStore
from relay.storeurl import parse_store_url
from tests.processes import free_port


def test_store_urls():
    url = parse_store_url("redis+cluster://10.0.0.1:7000,10.0.0.2:7001")
    assert (url.kind, url.nodes) == ("cluster", (("10.0.0.1", 7000), ("10.0.0.2", 7001)))
    url = parse_store_url("redis+cluster://:s%40cret@h1:7000/0")
    assert (url.password, url.username, url.nodes) == ("s@cret", None, (("h1", 7000),))
    url = parse_store_url(
        "redis+sentinel://u:pw@s1:26379,s2,[::1]:26380/mymaster/2?sentinel_password=x"
    )
    assert url.kind == "sentinel" and url.service == "mymaster" and url.db == 2
    assert url.nodes == (("s1", 26379), ("s2", 26379), ("::1", 26380))
    assert (url.username, url.password, url.sentinel_password) == ("u", "pw", "x")
    assert parse_store_url("redis+sentinel://s1/mymaster").db == 0
    assert parse_store_url("redis://h:6379/1").kind == "redis"
    assert parse_store_url("memory").kind == "memory"
    assert "pw" not in repr(url)


@pytest.mark.parametrize(
    ("store", "says"),
    [
        ("http://h:1", "must be memory"),
        ("redis+cluster://h:port", "host:port"),
        ("redis+cluster://h:1/3", "db 0"),
        ("redis+sentinel://h:26379", "name the service"),
        ("redis+sentinel://h:26379/m/x", "must be a number"),
        ("redis+sentinel://:pw@h:26379/m/1/2", "name the service"),
        ("redis:///0", "host is missing"),
    ],
)
def test_bad_store_urls_are_refused_at_start(store, says):
    with pytest.raises(ConfigError) as e:
        load_settings([f"--store={store}"])
    assert says in str(e.value) and "pw" not in str(e.value)


@pytest.mark.gen_test(timeout=30)
@pytest.mark.parametrize("scheme", ["redis+cluster", "redis+sentinel"])
async def test_a_store_with_nothing_to_reach_answers_503_within_the_deadline(scheme):
    nodes = f"127.0.0.1:{free_port()},127.0.0.1:{free_port()}"
    url = f"{scheme}://{nodes}" + ("/relay/0" if scheme == "redis+sentinel" else "")
    store = RedisStore(url, 300)
    store.start()  # its listener retries in the background, quietly
    try:
        for _ in range(2):
            began = time.monotonic()
            with pytest.raises(RelayError) as e:
                await store.get("a" * 32)
            assert e.value.code == "store_unavailable" and time.monotonic() - began < 4
            with pytest.raises(RelayError):
                await store.create("anonymous", "1", replayable=True)
        assert len(store) == 0  # the session it could not write is not kept
        assert not await store.reachable()
    finally:
        await store.close()
