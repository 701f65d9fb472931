"""Idempotent one-shot streams: the ``Idempotency-Key`` header and the (user, key) index.

A ``POST /aianswer/streamAsk`` that carries an ``Idempotency-Key`` is a
replayable session, indexed under (scope, key): the scope is the user of
``--auth-tokens``, or for anonymous clients their address (the one the rate
limit counts by). An entry names the session's uid and the SHA-256 of the raw
request body; a repeat with the same body reads that session again (no new
upstream call), one with another body is 422 ``idempotency_key_reused``.

Entries are named by ``sha256(scope NUL key)``, so neither the key nor the
scope is stored, and every entry has the same small size whatever the key.
An entry lives as long as its session: in memory the store drops both
together; in Redis the entry expires with the session's TTL, and one whose
session is gone (deleted, expired) counts as absent and is replaced.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from relay.errors import RelayError

if TYPE_CHECKING:
    from relay.sessions import Session

KEY_HEADER = "Idempotency-Key"
SESSION_HEADER = "X-Relay-Session"
_VISIBLE = re.compile(r"[\x21-\x7e]{16,128}")
# An RFC 8941 sf-string: printable ASCII in quotes, with \" and \\ escapes.
_SF_STRING = re.compile(r'"((?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\["\\])*)"')
_SF_ESCAPE = re.compile(r"\\([\"\\])")
# Rounds of find_or_start before giving up: a stale entry, then a lost race, is the most
# a request can meet.
_ROUNDS = 3


def parse_key(values: list[str]) -> str | None:
    """The key of the ``Idempotency-Key`` header values; None when there is none.

    A quoted structured-field string has its quotes stripped (the IETF draft
    defines the header as one). Raises 400 ``bad_request`` for anything else
    that is not 16 to 128 visible ASCII characters; the message never echoes it.
    """
    if not values:
        return None
    if len(values) > 1:
        raise _bad_key("send one Idempotency-Key header, not several")
    value = values[0]
    quoted = _SF_STRING.fullmatch(value)
    if quoted is not None:
        value = _SF_ESCAPE.sub(r"\1", quoted.group(1))
    if not _VISIBLE.fullmatch(value):
        raise _bad_key("Idempotency-Key must be 16 to 128 visible ASCII characters")
    return value


def _bad_key(message: str) -> RelayError:
    return RelayError(400, "bad_request", message)


def reused() -> RelayError:
    return RelayError(
        422,
        "idempotency_key_reused",
        "this Idempotency-Key was used with another request body; use a new key",
    )


@dataclass(frozen=True, slots=True)
class KeyedAsk:
    """A keyed request as the index sees it: the entry's name and the body's digest."""

    index: str  # sha256 of scope NUL key, hex
    body: str  # sha256 of the raw request body, hex

    @classmethod
    def of(cls, scope: str, key: str, body: bytes) -> KeyedAsk:
        index = hashlib.sha256(f"{scope}\0{key}".encode()).hexdigest()
        return cls(index, hashlib.sha256(body).hexdigest())


@dataclass(frozen=True, slots=True)
class Entry:
    """What the index holds for one key: the answer's session and its request body."""

    uid: str
    body: str


class MemoryIndex:
    """The index of one process's memory store; `relay.sessions.MemoryStore` drops an
    entry when it drops the entry's session."""

    def __init__(self) -> None:
        self._entries: dict[str, Entry] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, index: str) -> Entry | None:
        return self._entries.get(index)

    def claim(self, ask: KeyedAsk, uid: str, stale: str = "") -> Entry | None:
        """Name ``uid`` under ``ask``, unless another session holds it: then that entry.
        An entry of the session ``stale`` (found gone) is replaced."""
        held = self._entries.get(ask.index)
        if held is not None and held.uid != stale:
            return held
        self._entries[ask.index] = Entry(uid, ask.body)
        return None

    def release(self, index: str, uid: str) -> None:
        """Forget the entry if it still names ``uid``."""
        held = self._entries.get(index)
        if held is not None and held.uid == uid:
            del self._entries[index]


def redis_key(index: str) -> str:
    return f"relay:idem:{index}"


# Atomic claim: KEYS[1] the entry; ARGV uid, body, reader, stale uid ("" for none), ttl,
# and the reader's process. A hash holds the uid, the body's digest, and the token and
# process (relay.redis_store's ``proc``) of the answer's latest reader.
_CLAIM = """
local held = redis.call('HMGET', KEYS[1], 'uid', 'body')
if held[1] and held[1] ~= ARGV[4] then return held end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'uid', ARGV[1], 'body', ARGV[2], 'reader', ARGV[3], 'proc', ARGV[6])
redis.call('EXPIRE', KEYS[1], ARGV[5])
return false
"""

# A new reader: KEYS[1] the entry; ARGV its token and process. Answers the process of the
# reader it replaces (nil if none, or if the entry is gone: nothing is recreated).
_READER = """
if redis.call('EXISTS', KEYS[1]) == 0 then return false end
local previous = redis.call('HGET', KEYS[1], 'proc')
redis.call('HSET', KEYS[1], 'reader', ARGV[1], 'proc', ARGV[2])
return previous
"""


class RedisIndex:
    """The index in Redis (``relay:idem:<index>``), shared by every process; the store
    (`relay.redis_store.RedisStore`) wraps each call in its deadline."""

    def __init__(self, redis: Any, ttl: float) -> None:
        self.redis = redis
        self.ttl = int(ttl) + 1
        self._claim = redis.register_script(_CLAIM)
        self._reader = redis.register_script(_READER)

    async def get(self, index: str) -> Entry | None:
        """The entry, its lifetime renewed (a repeat is activity)."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.hmget(redis_key(index), "uid", "body")
        pipe.expire(redis_key(index), self.ttl)
        (uid, body), _ = await pipe.execute()
        return None if uid is None else Entry(uid.decode(), (body or b"").decode())

    async def claim(
        self, ask: KeyedAsk, uid: str, reader: str, stale: str, proc: str = ""
    ) -> Entry | None:
        """Name ``uid`` under ``ask`` with ``reader`` (of process ``proc``) as its reader,
        unless another session holds it: then that entry."""
        held = await self._claim(
            keys=[redis_key(ask.index)], args=[uid, ask.body, reader, stale, self.ttl, proc]
        )
        if held is None:
            return None
        return Entry(held[0].decode(), (held[1] or b"").decode())

    def refresh(self, pipe: Any, index: str) -> None:
        """Add the renewal of the entry's lifetime to ``pipe`` (with its session's)."""
        pipe.expire(redis_key(index), self.ttl)

    async def set_reader(self, index: str, reader: str, proc: str) -> str | None:
        """Record ``reader`` of process ``proc`` as the latest; the previous one's process."""
        previous = await self._reader(keys=[redis_key(index)], args=[reader, proc])
        return None if previous is None else previous.decode()

    async def reader(self, index: str) -> str | None:
        value = await self.redis.hget(redis_key(index), "reader")
        return None if value is None else value.decode()


class KeyedStore(Protocol):
    """What `find_or_start` needs of a session store."""

    async def keyed(self, index: str) -> Entry | None: ...

    async def claim(
        self, ask: KeyedAsk, uid: str, reader: str, stale: str = ""
    ) -> Entry | None: ...

    async def get(self, uid: str) -> Session | None: ...

    async def remove(self, uid: str) -> None: ...


async def find_or_start(
    store: KeyedStore,
    ask: KeyedAsk,
    reader: str,
    create: Callable[[], Awaitable[Session]],
) -> tuple[Session, bool]:
    """The answer for ``ask``: (its session, True) when this request starts it, else an
    existing one's (False). Raises 422 for a known key with another body.

    A new session is created (``create`` admits it) before it is claimed, so an
    entry always names a session that exists or existed; a claim lost to a
    concurrent request with the same key removes it again, unstarted, and reads
    the winner's. ``reader`` is the requesting stream's token.
    """
    held = await store.keyed(ask.index)
    mine: Session | None = None
    stale = ""
    try:
        for _ in range(_ROUNDS):
            if held is not None:
                if held.body != ask.body:
                    raise reused()
                session = await store.get(held.uid)
                if session is not None:
                    return session, False
                stale = held.uid  # deleted or expired: the key is free again
            if mine is None:
                mine = await create()
            held = await store.claim(ask, mine.uid, reader, stale)
            if held is None:
                started, mine = mine, None
                return started, True
        raise RelayError(503, "store_unavailable", "the Idempotency-Key is contended; retry")
    finally:
        if mine is not None:
            await store.remove(mine.uid)
