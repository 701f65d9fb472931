"""Copying a session this process runs to Redis (a `RedisWriter`).

The process that created a session runs its upstream call and keeps its events
in memory (a normal `Session`); a `RedisWriter` copies them to Redis with one
script call per upstream read, off the hot path. The script appends only if the
stream still ends where the writer left it: after a failover to a replica that
had not received the last entries, the writer hears where it ends now and
rewrites the rest from memory, so readers see no gap and no duplicate. The same
holds after Redis comes back (possibly empty, after a restart, or a promoted
replica): the writer resynchronises from the last entry Redis has and rewrites
what is missing from memory.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any

from relay.idempotency import redis_key
from relay.redis_client import BACKOFF, STORE_ERRORS, STORE_TIMEOUT
from relay.redis_keys import entry_seq, events_key, meta_key

if TYPE_CHECKING:
    from relay.redis_store import RedisStore
    from relay.sessions import Session

# The writer's append, atomic on one session's slot (the store registers it once:
# `RedisStore.append_script`). KEYS: events, meta. ARGV: the id the stream should end with
# ('' = no entry yet), ttl, the oldest event kept in memory, the first frame's event
# number, the frame count n, the end entry's id ('' = not the end), its field count e;
# then the n frames, the e end fields, and the meta fields.
# Answers nil, or, when the stream does not end where the writer left it (a failover to a
# replica that missed the last writes, a restart, a timed-out call that did run), the id
# it ends with: the writer starts again from there.
APPEND_SCRIPT = """
local top = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)[1]
local last = top and top[1] or ''
if last ~= ARGV[1] then return last end
local n, e, seq = tonumber(ARGV[5]), tonumber(ARGV[7]), tonumber(ARGV[4])
for i = 1, n do
  redis.call('XADD', KEYS[1], string.format('%d-0', seq + i - 1), 'f', ARGV[7 + i])
end
if ARGV[6] ~= '' then
  redis.call('XADD', KEYS[1], ARGV[6], unpack(ARGV, 8 + n, 7 + n + e))
end
if tonumber(ARGV[3]) > 1 then
  redis.call('XTRIM', KEYS[1], 'MINID', ARGV[3])
end
redis.call('HSET', KEYS[2], unpack(ARGV, 8 + n + e, #ARGV))
redis.call('EXPIRE', KEYS[1], ARGV[2])
redis.call('EXPIRE', KEYS[2], ARGV[2])
return false
"""


class RedisWriter:
    """Copies one local session's events to Redis, batching what arrived since the last write."""

    def __init__(self, store: RedisStore, session: Session) -> None:
        self.store = store
        self.session = session
        self.synced = 0  # the last event Redis has
        self.end_written = False
        self._changed = asyncio.Event()
        self._index_renewed = 0.0  # when the Idempotency-Key entry's lifetime was (monotonic)

    def wake(self) -> None:
        self._changed.set()

    def write_meta(self) -> Awaitable[Any]:
        pipe = self.store.redis.pipeline(transaction=False)
        pipe.hset(meta_key(self.session.uid), mapping=self._meta())
        ttl = int(self.store.ttl) + 1
        pipe.expire(meta_key(self.session.uid), ttl)
        pipe.expire(events_key(self.session.uid), ttl)
        if self.session.keyed is not None:
            self._index_renewed = time.monotonic()
            self.store.index.refresh(pipe, self.session.keyed)
        written: Awaitable[Any] = pipe.execute()
        return written

    def _meta(self) -> dict[str, Any]:
        s = self.session
        meta: dict[str, Any] = {
            "owner": s.owner,
            "robot": s.robot_id,
            "state": s.state,
            "last_seq": s.last_seq,
            "pid": self.store.pid,
            "proc": self.store.proc,
        }
        if s.error is not None:
            meta.update(code=s.error.code, status=s.error.status, message=s.error.message)
        if s.keyed is not None:
            meta["idem"] = s.keyed
        return meta

    async def run(self) -> None:
        attempt = 0
        while True:
            await self._changed.wait()
            self._changed.clear()
            while not self._caught_up():
                try:
                    await asyncio.wait_for(self._flush(), STORE_TIMEOUT)
                    attempt = 0
                except STORE_ERRORS:
                    self.store.troubled()
                    await asyncio.sleep(BACKOFF[min(attempt, len(BACKOFF) - 1)])
                    attempt += 1
            if self.end_written:
                self.session.observers.remove(self.wake)  # no session <-> writer cycle left
                return

    def _caught_up(self) -> bool:
        s = self.session
        return self.synced >= s.last_seq and (s.running or self.end_written)

    def _top(self) -> str:
        """The id Redis's stream ends with, as far as this writer knows."""
        if self.end_written:
            return f"{self.synced}-1"
        return f"{self.synced}-0" if self.synced else ""

    async def _flush(self) -> None:
        s = self.session
        start = max(self.synced + 1, s.first_seq)
        frames = s.frames_after(start - 1)
        upto = s.last_seq
        ending = not s.running
        end: list[Any] = []
        if ending:
            end = ["end", s.state]
            if s.error is not None:
                end += ["code", s.error.code, "status", s.error.status]
                end += ["message", s.error.message]
        meta = [item for pair in self._meta().items() for item in pair]
        args = [self._top(), int(self.store.ttl) + 1, s.first_seq, start, len(frames)]
        args += [f"{upto}-1" if ending else "", len(end), *frames, *end, *meta]
        pending = [self.store.append_script(keys=[events_key(s.uid), meta_key(s.uid)], args=args)]
        keyed = s.keyed
        renew = keyed is not None and (
            ending or time.monotonic() - self._index_renewed > self.store.ttl / 4
        )
        if renew and keyed is not None:
            # The entry is in another slot: renewed beside the append, not in it, and
            # not on every append (it need only outlive the session).
            pending.append(self.store.redis.expire(redis_key(keyed), self.store.index.ttl))
        found, *_ = await asyncio.gather(*pending)
        if renew:
            self._index_renewed = time.monotonic()
        if found is not None:
            # Redis's stream does not end where this writer left it: go on from its end.
            self.synced, part = entry_seq(found)
            self.end_written = part == 1
            return
        self.synced = upto
        self.end_written = ending
