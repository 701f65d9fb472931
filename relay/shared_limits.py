"""Admission limits counted in Redis, so that all the processes on a store keep one budget.

With a Redis store, ``--rate-limit`` and the caps on running answers per client
(``--max-answers-per-user``, ``--max-answers-per-address``) count in Redis, each
decision one atomic script on one key (any slot of a cluster), timed by the
server's clock:

* the rate limit: a token bucket per client, ``relay:rate:<digest>``, a hash
  (tokens, at) that expires once the bucket would be full again;
* running answers: a sorted set per client, ``relay:answers:<digest>``, one
  member per running answer (a random lease) scored with the time its lease
  ends. Admission drops the ended leases, counts, and adds one if under the cap.
  Each process renews its answers' leases every `RENEW` seconds and removes one
  when its answer ends, so the leases of a process that crashed end within
  `LEASE_MS` and leak nothing.

Clients are named by a digest of the user or address (neither is stored).

When Redis does not answer (within `LIMIT_TIMEOUT`), the process counts in its
own memory (`relay.limits.RateLimiter` and the store's `Ledger`), logs it once,
and ``relay_limits_local`` is 1. A PING every `PROBE` seconds finds Redis back;
the process then counts in Redis again, and renews its running answers' leases at
once, the ones it admitted meanwhile included.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import secrets
from collections.abc import Awaitable, Callable, Coroutine
from functools import partial
from typing import TYPE_CHECKING, Any, TypeVar

from relay.redis_client import STORE_ERRORS

if TYPE_CHECKING:
    from relay.sessions import Session

log = logging.getLogger("relay.limits")

LEASE_MS = 30_000  # a running answer's lease: renewed while it runs, else it ends
RENEW = 10.0  # seconds between renewals (a third of the lease)
LIMIT_TIMEOUT = 1.0  # seconds a limit waits for Redis before this process counts alone
PROBE = 1.0  # seconds between PINGs while counting alone

T = TypeVar("T")

# KEYS[1] the bucket; ARGV[1] new streams per minute. Answers 0 (go) or the whole seconds
# until the next one is allowed.
_RATE = """
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local cap = tonumber(ARGV[1])
local per_ms = cap / 60000
local held = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens = cap
if held[1] then
  tokens = math.min(cap, tonumber(held[1]) + math.max(0, now - tonumber(held[2])) * per_ms)
end
local wait = 0
if tokens >= 1 then
  tokens = tokens - 1
else
  wait = math.max(1, math.ceil((1 - tokens) / per_ms / 1000))
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'at', now)
redis.call('PEXPIRE', KEYS[1], math.ceil((cap - tokens) / per_ms) + 1)
return wait
"""

# KEYS[1] the running answers; ARGV the cap, the new lease, the lease's ms. Answers 1
# (admitted, the lease added) or 0.
_ADMIT = """
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[1]) then return 0 end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1
"""

# KEYS[1] the running answers; ARGV the lease's ms, then leases to renew (added if absent:
# Redis may have lost them, or they were admitted while this process counted alone).
_RENEW = """
local t = redis.call('TIME')
local until_ = t[1] * 1000 + math.floor(t[2] / 1000) + tonumber(ARGV[1])
for i = 2, #ARGV do redis.call('ZADD', KEYS[1], until_, ARGV[i]) end
redis.call('PEXPIRE', KEYS[1], ARGV[1])
return #ARGV - 1
"""


def _digest(name: str) -> str:
    return hashlib.sha256(name.encode()).hexdigest()[:32]


def rate_key(client: str) -> str:
    return f"relay:rate:{_digest(client)}"


def answers_key(quota_key: str) -> str:
    return f"relay:answers:{_digest(quota_key)}"


def new_lease() -> str:
    return secrets.token_hex(8)


class SharedLimits:
    """The rate limit and the answer caps of every process on one Redis (see above)."""

    def __init__(self, redis: Any, per_minute: int) -> None:
        self.redis = redis
        self.per_minute = per_minute
        self.local = False  # counting in this process only (Redis did not answer)
        self._leases: dict[str, tuple[str, str]] = {}  # session uid -> (quota key, lease)
        self._rate = redis.register_script(_RATE)
        self._admit = redis.register_script(_ADMIT)
        self._renew = redis.register_script(_RENEW)
        self._tasks: set[asyncio.Task[Any]] = set()
        self._renewed = asyncio.Event()  # set to renew at once

    def start(self) -> None:
        self._spawn(self._renew_loop())

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    # -- decisions ---------------------------------------------------------------------

    async def admit(self, quota_key: str, cap: int, lease: str) -> bool | None:
        """Whether one more answer of ``quota_key`` fits under ``cap`` (then ``lease``
        holds its place); None when this process must count alone."""
        admitted = await self._remote(
            lambda: self._admit(keys=[answers_key(quota_key)], args=[cap, lease, LEASE_MS])
        )
        return None if admitted is None else bool(admitted)

    async def rate(self, client: str) -> int | None:
        """0 when ``client`` may start a stream, else the seconds to wait; None when this
        process must count alone."""
        wait = await self._remote(
            lambda: self._rate(keys=[rate_key(client)], args=[self.per_minute])
        )
        return None if wait is None else int(wait)

    # -- leases ------------------------------------------------------------------------

    def track(self, session: Session, quota_key: str, lease: str) -> None:
        """``session`` holds ``lease``: renewed while it runs, removed when it ends."""
        self._leases[session.uid] = (quota_key, lease)

    def ended(self, session: Session) -> None:
        """An answer ended (the store's `Ledger` tells): its lease goes."""
        held = self._leases.pop(session.uid, None)
        if held is not None:
            self.release(*held)

    def release(self, quota_key: str, lease: str) -> None:
        if not self.local:
            self._spawn(self._release(quota_key, lease))

    async def _release(self, quota_key: str, lease: str) -> None:
        try:
            await asyncio.wait_for(self.redis.zrem(answers_key(quota_key), lease), LIMIT_TIMEOUT)
        except STORE_ERRORS:
            pass  # it ends with its lease

    async def _renew_loop(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._renewed.wait(), RENEW)
            except TimeoutError:
                pass
            self._renewed.clear()
            if self.local or not self._leases:
                continue
            by_key: dict[str, list[str]] = {}
            for quota_key, lease in self._leases.values():
                by_key.setdefault(quota_key, []).append(lease)
            await self._remote(partial(self._renew_all, by_key))

    def _renew_all(self, by_key: dict[str, list[str]]) -> Awaitable[list[Any]]:
        return asyncio.gather(
            *(
                self._renew(keys=[answers_key(k)], args=[LEASE_MS, *leases])
                for k, leases in by_key.items()
            )
        )

    # -- Redis, or this process alone --------------------------------------------------

    async def _remote(self, call: Callable[[], Any]) -> Any | None:
        """``call()``'s answer from Redis, or None (and counting alone) if it has none."""
        if self.local:
            return None
        try:
            return await asyncio.wait_for(call(), LIMIT_TIMEOUT)
        except STORE_ERRORS:
            self._go_local()
            return None

    def _go_local(self) -> None:
        if self.local:
            return
        self.local = True
        log.warning(
            "the store does not answer: --rate-limit and the answer caps count in this "
            "process only until it does"
        )
        self._spawn(self._probe())

    async def _probe(self) -> None:
        while True:
            await asyncio.sleep(PROBE)
            try:
                await asyncio.wait_for(self.redis.ping(), LIMIT_TIMEOUT)
            except STORE_ERRORS:
                continue
            self.local = False
            log.info("the store answers again: the limits count across processes")
            self._renewed.set()  # count this process's running answers there at once
            return

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task
