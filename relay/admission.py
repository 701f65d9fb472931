"""Admission: one decision, before anything is created, for every request that costs.

A new answer (``POST /aianswer/streamAsk`` or ``POST /aianswer/sessions``)
starts a paid upstream call; a reader (``GET /aianswer/stream/<uid>``) holds a
connection. Both pass here, in this order, and the first bound that is hit
answers:

1. ``--max-streams``: the store's `Ledger` slots, that is client streams plus
   upstream calls running with no stream. 503 ``at_capacity``. A session POST
   takes a slot for its call, and the first reader of a running session takes
   that slot over, so an admitted session's reader is never refused; a second
   concurrent reader, or a reader of a finished session, needs a slot of its own.
2. Running answers per client (new answers only): ``--max-answers-per-user``
   for users named by ``--auth-tokens``; anonymous clients share addresses
   behind proxies and load testers, so their cap, ``--max-answers-per-address``,
   is off unless set. 429 ``too_many_answers``, ``Retry-After: 1``.
3. ``--rate-limit`` (new answers only): 429 ``rate_limited``. Last, so that a
   request refused for another reason spends none of the client's budget.

``--max-streams`` counts per process (it is the process's capacity). With a
Redis store the other two count in Redis across processes (`SharedLimits`,
relay/shared_limits.py), and in the process while Redis does not answer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from relay.config import Settings
from relay.errors import RelayError
from relay.limits import RateLimiter
from relay.metrics import Metrics
from relay.sessions import Ledger, Session

if TYPE_CHECKING:
    from relay.shared_limits import SharedLimits


@dataclass(frozen=True, slots=True)
class Quota:
    """What a new answer counts under: its client's key, and its lease in Redis's count
    ("" when the limits count in the process only)."""

    key: str
    lease: str = ""


class Admission:
    def __init__(
        self,
        settings: Settings,
        ledger: Ledger,
        rate: RateLimiter,
        metrics: Metrics,
        shared: SharedLimits | None = None,
    ) -> None:
        self.max_slots = settings.max_streams
        self.per_user = settings.max_answers_per_user if settings.auth_tokens else 0
        self.per_address = 0 if settings.auth_tokens else settings.max_answers_per_address
        self.rate_by_user = bool(settings.auth_tokens)
        self.ledger = ledger
        self.rate = rate
        self.metrics = metrics
        self.shared = shared
        self.rate_shared = shared is not None and settings.rate_limit > 0

    async def answer(self, user: str, address: str) -> Quota | None:
        """Admit a new answer for ``user`` at ``address``; return the quota its session
        counts under (None: uncapped), which `bind` or `release` takes. Raises `RelayError`
        (with its ``retry_after``)."""
        self._slot()
        quota, cap = None, 0
        if self.per_user:
            quota, cap = Quota(f"user:{user}"), self.per_user
        elif self.per_address:
            quota, cap = Quota(f"addr:{address}"), self.per_address
        if quota is not None:
            admitted = None
            if self.shared is not None:
                from relay.shared_limits import new_lease

                quota = Quota(quota.key, new_lease())
                admitted = await self.shared.admit(quota.key, cap, quota.lease)
            if admitted is None:  # counted here
                admitted = self.ledger.running(quota.key) < cap
            if not admitted:
                self._refuse(
                    429, "too_many_answers", f"at most {cap} answers at once; retry later", 1
                )
        client = user if self.rate_by_user else address
        shared = self.shared if self.rate_shared else None
        wait = await shared.rate(client) if shared is not None else None
        if wait is None:
            wait = self.rate.allow(client)
        if wait:
            self.release(quota)
            self._refuse(429, "rate_limited", "too many new streams; retry later", wait)
        return quota

    def bind(self, session: Session, quota: Quota | None) -> None:
        """``session`` was created under ``quota``: its lease lasts as long as it runs."""
        if self.shared is not None and quota is not None and quota.lease:
            self.shared.track(session, quota.key, quota.lease)

    def release(self, quota: Quota | None) -> None:
        """``quota`` was not used (no session was created under it)."""
        if self.shared is not None and quota is not None and quota.lease:
            self.shared.release(quota.key, quota.lease)

    def reader(self, session: Session) -> None:
        """Admit one more reader of ``session``. Raises `RelayError` (with its ``retry_after``)."""
        if session.reader_needs_slot():
            self._slot()

    def _slot(self) -> None:
        if self.ledger.slots >= self.max_slots:
            self._refuse(503, "at_capacity", "the relay is at capacity; retry shortly", 1)

    def _refuse(self, status: int, code: str, message: str, retry_after: int) -> None:
        self.metrics.refused.labels(code).inc()
        raise RelayError(status, code, message, retry_after)
