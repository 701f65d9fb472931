"""Who reads a keyed one-shot answer: takeover by a newer request, and the resume grace.

A keyed answer (relay/idempotency.py) has one reader at a time: the request
that started it, then each repeat in turn. Every keyed stream carries a random
token, and the store records the token of the latest one (`take_over`); a
repeat closes the older stream of the same answer, here through `Readers`, on
other processes through the Redis store's takeover channel.

When a keyed stream's client leaves, the answer runs on: `Graces` waits
``--resume-grace`` seconds, then cancels it if it still runs, nobody reads it
here, and no keyed stream on any process has taken it over since (the store
still names the token of the stream that left).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from relay.sessions import Session

log = logging.getLogger("relay.stream")


def new_token() -> str:
    """A keyed stream's reader token (only compared, never a capability)."""
    return secrets.token_hex(8)


class Reader(Protocol):
    """A keyed client stream, as the takeover sees it."""

    token: str

    def taken_over(self) -> None: ...


class Readers:
    """The keyed stream reading each answer on this process: the newest one only."""

    def __init__(self) -> None:
        self._by_uid: dict[str, Reader] = {}

    def __len__(self) -> int:
        return len(self._by_uid)

    def enter(self, uid: str, reader: Reader) -> None:
        """``reader`` reads answer ``uid`` now; an older stream of it here is closed."""
        older = self._by_uid.get(uid)
        self._by_uid[uid] = reader
        if older is not None and older is not reader:
            older.taken_over()

    def leave(self, uid: str, reader: Reader) -> None:
        if self._by_uid.get(uid) is reader:
            del self._by_uid[uid]

    def taken_elsewhere(self, uid: str, token: str) -> None:
        """A keyed stream with ``token`` on another process reads ``uid`` now."""
        reader = self._by_uid.get(uid)
        if reader is not None and reader.token != token:
            del self._by_uid[uid]
            reader.taken_over()


class GraceStore(Protocol):
    """What `Graces` needs of the session store."""

    async def is_reader(self, session: Session, reader: str) -> bool: ...

    async def abandon(self, session: Session) -> None: ...


class Graces:
    """Cancels keyed answers whose client left and did not come back within ``seconds``."""

    def __init__(self, store: GraceStore, seconds: float) -> None:
        self.store = store
        self.seconds = seconds
        self._tasks: set[asyncio.Task[None]] = set()

    def __len__(self) -> int:
        return len(self._tasks)

    def start(self, session: Session, reader: str) -> None:
        """The keyed stream ``reader`` of ``session`` lost its client."""
        task = asyncio.ensure_future(self._wait(session, reader))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _wait(self, session: Session, reader: str) -> None:
        await asyncio.sleep(self.seconds)
        if not session.running or session.readers:
            return
        if await self.store.is_reader(session, reader):
            log.info("no client came back for answer %s; cancelling it", session.uid[:8])
            await self.store.abandon(session)

    def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
