"""The in-memory session store (the default): this process's sessions in a dict.

`relay.redis_store.RedisStore` keeps one of these for the sessions it runs here.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator

from relay.errors import RelayError
from relay.idempotency import Entry, KeyedAsk, MemoryIndex
from relay.sessions import Ledger, Session, SessionLimits


def new_uid() -> str:
    """32 hex characters (128 bits) from the OS CSPRNG: the session's capability."""
    return secrets.token_hex(16)


class MemoryStore:
    """Sessions of this process, in a dict. The default store.

    A session lives ``ttl`` seconds after its last activity; `prune` (run by a
    PeriodicCallback every ``--prune-interval``) removes the expired ones and
    cancels any that still ran. When the kept bytes of all sessions pass
    ``max_kept_bytes``, the oldest finished sessions are dropped at once (never a
    running one). `cancel_unattached` cancels replayable sessions that no reader
    attached to within the grace period. Keyed sessions (``Idempotency-Key``) are
    indexed in ``index``; an entry goes with its session.
    """

    def __init__(
        self, ttl: float, limits: SessionLimits | None = None, max_kept_bytes: int = 1 << 62
    ) -> None:
        self.ttl = ttl
        self.limits = limits or SessionLimits()
        self.ledger = Ledger(max_kept_bytes)
        self.ledger.evict = self._evict
        self.evicted = 0  # finished sessions dropped to stay under max_kept_bytes
        self._sessions: dict[str, Session] = {}
        self._unattached: dict[str, Session] = {}  # replayable sessions, oldest first
        self.index = MemoryIndex()

    def __len__(self) -> int:
        return len(self._sessions)

    def __iter__(self) -> Iterator[Session]:
        return iter(list(self._sessions.values()))

    async def create(
        self,
        owner: str,
        robot_id: str,
        replayable: bool,
        quota_key: str | None = None,
        keyed: str | None = None,
    ) -> Session:
        """A new session; ``keyed`` names its index entry, claimed afterwards (`claim`)."""
        session = Session(
            new_uid(), owner, robot_id, replayable, self.limits, self.ledger, quota_key
        )
        session.keyed = keyed
        self._sessions[session.uid] = session
        if replayable:
            self._unattached[session.uid] = session
        return session

    def start(self) -> None:
        """Nothing to start: the prune callback is the app's."""

    async def close(self) -> None:
        """Nothing to close."""

    async def reachable(self) -> bool:
        """For ``GET /readyz``: memory is always there."""
        return True

    def find(self, uid: str) -> Session | None:
        """The session with this uid, expired or not (no I/O)."""
        return self._sessions.get(uid)

    async def get(self, uid: str) -> Session | None:
        session = self._sessions.get(uid)
        if session is not None and self._expired(session, time.monotonic()):
            self._drop(session)
            return None
        return session

    async def remove(self, uid: str) -> None:
        session = self._sessions.get(uid)
        if session is not None:
            self._drop(session)

    # -- keyed sessions (relay.idempotency, relay.resume) ----------------------------

    async def keyed(self, index: str) -> Entry | None:
        return self.index.get(index)

    async def claim(self, ask: KeyedAsk, uid: str, reader: str, stale: str = "") -> Entry | None:
        return self.index.claim(ask, uid, stale)

    async def take_over(self, session: Session, reader: str) -> None:
        """``reader`` reads the keyed ``session`` now (older readers here are closed
        by `relay.resume.Readers`)."""
        session.reader = reader

    async def is_reader(self, session: Session, reader: str) -> bool:
        """Whether ``reader`` is still the last keyed stream to have read ``session``."""
        return session.reader == reader

    async def abandon(self, session: Session) -> None:
        """Cancel a keyed answer that no client came back for."""
        session.cancel(abandoned())

    def prune(self) -> int:
        """Remove expired sessions; return how many went."""
        now = time.monotonic()
        expired = [s for s in self._sessions.values() if self._expired(s, now)]
        for session in expired:
            self._drop(session)
        return len(expired)

    def unattached(self, now: float, grace: float) -> list[Session]:
        """Running sessions created over ``grace`` seconds ago that no reader attached to."""
        late = []
        for session in self._unattached.values():
            if session.created + grace > now:
                break
            late.append(session)
        for session in late:
            del self._unattached[session.uid]
        return [s for s in late if s.running and not s.attached]

    def cancel_unattached(self, now: float, grace: float) -> int:
        """Cancel the `unattached` sessions; return how many."""
        late = self.unattached(now, grace)
        for session in late:
            session.cancel(not_attached(grace))
        return len(late)

    def _evict(self) -> None:
        finished = self.ledger.finished
        while finished and self.ledger.kept_bytes > self.ledger.max_kept_bytes:
            session = next(iter(finished.values()))
            session.release()
            if self._sessions.get(session.uid) is session:
                self._drop(session)
                self.evicted += 1

    def _expired(self, session: Session, now: float) -> bool:
        return now - session.last_activity > self.ttl

    def _drop(self, session: Session) -> None:
        del self._sessions[session.uid]
        self._unattached.pop(session.uid, None)
        if session.keyed is not None:
            self.index.release(session.keyed, session.uid)
        session.release()
        session.cancel(RelayError(410, "expired", "the session expired"))


def not_attached(grace: float) -> RelayError:
    return RelayError(
        408, "not_attached", f"no client attached to the answer within {grace:g} seconds"
    )


def abandoned() -> RelayError:
    return RelayError(
        408, "not_attached", "no client came back for the answer within --resume-grace seconds"
    )
