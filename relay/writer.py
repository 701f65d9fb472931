"""Flow control for one event-stream response: the one object that owns its socket writes.

An `EventWriter` frames body chunks and writes them to the client's connection
(`relay.http1server.ServerConnection`), which sends at once what the socket
takes and keeps the rest in its transport; the writer is then blocked until
that has drained, and the stream's reader (`relay.eventstream.EventStreamHandler`)
reads nothing more from its session meanwhile, and reads at most `SLICE` bytes
at a time. So a client that does not read holds at most one slice of queued
bytes, whatever the size of the session it replays (the rest stays shared in
the session), and ``--send-timeout`` bounds for how long.

Caveats: the headers and the first chunk go through Tornado's own ``flush()``
(the handler's job, before the writer exists); an HTTP/1.0 response is not
chunked and ends with the connection.
"""

from __future__ import annotations

import asyncio
import time

from relay.http1server import ServerConnection

# The most a reader takes from its session per write, and so the most it queues.
SLICE = 256 << 10


class EventWriter:
    """Writes body chunks of one response: to the socket at once, else queued and awaited."""

    __slots__ = ("_chunked", "_conn", "_draining", "last_write", "queued_since")

    def __init__(
        self, conn: ServerConnection, chunked: bool, flushed: asyncio.Future[None]
    ) -> None:
        """``flushed`` is Tornado's flush of the headers and first chunk."""
        self._conn = conn
        self._chunked = chunked
        self._draining: asyncio.Future[None] | None = None
        self.queued_since = 0.0  # when bytes were first left queued (0: nothing queued)
        self.last_write = time.monotonic()
        if not (flushed.done() and flushed.exception() is None):
            self._queue(flushed)

    @property
    def blocked(self) -> bool:
        """Whether bytes are still queued: send nothing more before `drain`."""
        return self._draining is not None

    def send(self, frames: list[bytes], size: int) -> bool:
        """Send ``frames`` (``size`` bytes in all) as one body chunk; True when the socket
        took all of it.

        Otherwise the rest is queued and the writer is `blocked`. Raises
        `StreamClosedError` once the connection is closed.
        """
        self.last_write = time.monotonic()
        if not size:
            return True  # an empty chunk would end the response
        if self._chunked:
            data = b"".join([b"%x\r\n" % size, *frames, b"\r\n"])
        else:
            data = frames[0] if len(frames) == 1 else b"".join(frames)
        if self._conn.send(data):
            return True
        self._queue(self._conn.drained())
        return False

    async def drain(self) -> None:
        """Wait until the connection has sent what the socket did not take."""
        if self._draining is None:
            return
        try:
            await self._draining
        finally:
            self._draining = None
            self.queued_since = 0.0
            self.last_write = time.monotonic()

    def stalled(self, now: float, timeout: float) -> bool:
        """Whether queued bytes have waited longer than ``timeout`` seconds."""
        return bool(self.queued_since) and now - self.queued_since > timeout

    def close(self) -> None:
        self._conn.close()

    def _queue(self, future: asyncio.Future[None]) -> None:
        self._draining = future
        self.queued_since = self.last_write
