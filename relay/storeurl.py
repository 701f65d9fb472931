"""The ``--store`` URL: memory, one Redis, Redis behind Sentinel, or a Redis Cluster.

Parsed here without importing redis, so that the settings can refuse a bad URL
(exit 2) before anything starts:

* ``memory``
* ``redis://[[user]:password@]host:port/db`` (also ``rediss://``): one Redis;
* ``redis+sentinel://[[user]:password@]host:26379[,host:26379...]/service-name[/db]``:
  the master that the Sentinels name ``service-name``, followed through failovers;
  the credentials are the data nodes' (Sentinels that require a password of their
  own: ``?sentinel_password=...``);
* ``redis+cluster://[[user]:password@]host:port[,host:port...]``: a Redis Cluster,
  found from any of these nodes (db 0, the only one a cluster has).
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import parse_qs, unquote, urlsplit

SCHEMES = ("redis://", "rediss://", "redis+sentinel://", "redis+cluster://")
USAGE = (
    "memory, redis://host:port/db, redis+sentinel://host:26379[,host:26379]/service/db "
    "or redis+cluster://host:port[,host:port]"
)


@dataclass(frozen=True, slots=True)
class StoreURL:
    kind: str  # "memory", "redis", "sentinel" or "cluster"
    url: str  # as given ("redis": what redis-py's from_url reads)
    nodes: tuple[tuple[str, int], ...] = ()  # Sentinels, or cluster seed nodes
    service: str = ""  # the Sentinel service name
    db: int = 0
    username: str | None = None
    password: str | None = None
    sentinel_password: str | None = None

    def __repr__(self) -> str:  # never the password
        return f"StoreURL({self.kind}, nodes={self.nodes}, service={self.service!r}, db={self.db})"


def parse_store_url(text: str) -> StoreURL:
    """The store ``text`` names; raises ValueError saying what is wrong (never echoing a
    password)."""
    if text == "memory":
        return StoreURL("memory", text)
    if text.startswith(("redis://", "rediss://")):
        if not urlsplit(text).hostname:
            raise ValueError(f"a host is missing; use {USAGE}")
        return StoreURL("redis", text)
    if not text.startswith(SCHEMES):
        raise ValueError(f"must be {USAGE}")
    kind = "sentinel" if text.startswith("redis+sentinel://") else "cluster"
    rest = text.partition("://")[2]
    rest, _, query = rest.partition("?")
    userinfo, at, hostpart = rest.rpartition("@")
    if not at:
        userinfo, hostpart = "", rest
    hosts, _, path = hostpart.partition("/")
    nodes = tuple(_node(h, 26379 if kind == "sentinel" else 6379) for h in hosts.split(","))
    user, colon, password = userinfo.partition(":")
    options = {k: v[-1] for k, v in parse_qs(query).items()}
    parts = [p for p in path.split("/") if p]
    url = StoreURL(
        kind,
        text,
        nodes,
        username=unquote(user) or None,
        password=unquote(password) if colon else None,
        sentinel_password=options.get("sentinel_password"),
    )
    if kind == "cluster":
        if parts and parts != ["0"]:
            raise ValueError("a Redis Cluster has db 0 only: redis+cluster://host:port[,host:port]")
        return url
    if not parts or len(parts) > 2:
        raise ValueError("name the service: redis+sentinel://host:26379[,host:26379]/service/db")
    if len(parts) == 2 and not parts[1].isdigit():
        raise ValueError("the db after the service name must be a number")
    return StoreURL(
        kind,
        text,
        nodes,
        service=unquote(parts[0]),
        db=int(parts[1]) if len(parts) == 2 else 0,
        username=url.username,
        password=url.password,
        sentinel_password=url.sentinel_password,
    )


def _node(text: str, default_port: int) -> tuple[str, int]:
    host, colon, port = text.rpartition(":")
    if not colon:
        host, port = text, str(default_port)
    host = host.strip("[]")  # an IPv6 address in brackets
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError("every node must be host:port")
    return host, int(port)
