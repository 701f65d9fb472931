"""Admission limits: new streams per client per minute, and the descriptor budget."""

from __future__ import annotations

import logging
import math
import resource
import time

log = logging.getLogger("relay")

# Descriptors kept back for the listening socket, logs, Redis, health checks.
FD_RESERVE = 64
# What --max-streams=0 (the default) allows at most, when the descriptor limit holds more.
DEFAULT_MAX_STREAMS = 10_000


class RateLimiter:
    """A token bucket per client: ``per_minute`` new streams, refilled continuously.

    ``allow`` answers 0 when the stream may start, else the whole seconds until it
    could (for ``Retry-After``). Full buckets carry no information, so `prune`
    drops them and the table only holds recently active clients.
    """

    def __init__(self, per_minute: int) -> None:
        self.capacity = float(per_minute)
        self.rate = per_minute / 60.0
        self._buckets: dict[str, tuple[float, float]] = {}  # client -> (tokens, at)

    def allow(self, client: str, now: float | None = None) -> int:
        if self.capacity <= 0:
            return 0
        now = time.monotonic() if now is None else now
        tokens, at = self._buckets.get(client, (self.capacity, now))
        tokens = min(self.capacity, tokens + (now - at) * self.rate)
        if tokens >= 1.0:
            self._buckets[client] = (tokens - 1.0, now)
            return 0
        self._buckets[client] = (tokens, now)
        return max(1, math.ceil((1.0 - tokens) / self.rate))

    def prune(self, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        full = [
            client
            for client, (tokens, at) in self._buckets.items()
            if tokens + (now - at) * self.rate >= self.capacity
        ]
        for client in full:
            del self._buckets[client]

    def __len__(self) -> int:
        return len(self._buckets)


def raise_fd_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit (logged); return the soft limit now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            log.debug("raised the open-file limit from %d to %d", soft, target)
            soft = target
        except (ValueError, OSError):
            log.warning("could not raise the open-file limit above %d", soft)
    return soft


def upstream_descriptors(embedded_demo: bool) -> int:
    """Descriptors one stream's upstream call holds: its socket, and with the embedded
    demo upstream (a server in this process) the demo's end of that connection too."""
    return 2 if embedded_demo else 1


def fit_descriptors(max_streams: int, upstream: int = 1) -> int:
    """Raise the descriptor limit; return how many of ``max_streams`` fit in it.

    Each stream holds its client socket and ``upstream`` descriptors for its
    upstream call (`upstream_descriptors`). ``max_streams=0`` asks for as many as
    fit, at most `DEFAULT_MAX_STREAMS`, quietly; an explicit number that does not
    fit is lowered, and a warning says so.
    """
    soft = raise_fd_limit()
    fitting = max(1, (soft - FD_RESERVE) // (1 + upstream))
    if max_streams == 0:
        return min(DEFAULT_MAX_STREAMS, fitting)
    if max_streams > fitting:
        log.warning(
            "--max-streams=%d needs %d descriptors but the limit is %d; using %d",
            max_streams,
            (1 + upstream) * max_streams + FD_RESERVE,
            soft,
            fitting,
        )
        return fitting
    return max_streams


def connection_budget(max_streams: int, upstream: int = 1) -> int:
    """How many client connections fit in the descriptor limit.

    Kept back: FD_RESERVE, and ``upstream`` descriptors for each of ``max_streams``
    (at most what `fit_descriptors`, which has run by then in the server, leaves
    them), so a stream that is admitted can always connect upstream.
    """
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        soft = 1 << 20
    usable = max(1 + upstream, soft - FD_RESERVE)
    return usable - min(max_streams, usable // (1 + upstream)) * upstream
