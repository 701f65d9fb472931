"""The application: shared state (`Relay`), routes, the watchdog tick and shutdown."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import re
import time
from typing import TYPE_CHECKING, Any, Protocol

from tornado.httputil import HTTPServerRequest
from tornado.ioloop import PeriodicCallback
from tornado.web import Application, RequestHandler

from relay import demo, eventstream, handlers, streamask
from relay.admission import Admission
from relay.config import Settings
from relay.errors import RelayError
from relay.forwarded import ClientAddress, parse_networks
from relay.limits import RateLimiter, fit_descriptors, upstream_descriptors
from relay.memory_store import MemoryStore
from relay.metrics import Metrics
from relay.resources import STATIC_DIR
from relay.resume import Graces, Readers
from relay.upstream import Upstream

if TYPE_CHECKING:
    from tornado.web import _HandlerDelegate  # what Application.find_handler is typed to return

    from relay.redis_store import RedisStore
    from relay.shared_limits import SharedLimits

log = logging.getLogger("relay")
access_log = logging.getLogger("tornado.access")

_HEX_RUN = re.compile(r"([0-9a-fA-F]{8})[0-9a-fA-F]{8,}")  # a uid, or anything like one


class Watched(Protocol):
    """An open client stream, as the watchdog sees it."""

    def check(self, now: float) -> None: ...


class Relay:
    """What every handler shares: settings, the session store, the upstream and metrics.

    It also owns the two periodic jobs: the prune run (``--prune-interval``) and
    a short watchdog tick for heartbeats, send timeouts and upstream idle
    timeouts, so no per-event timer is ever armed; and, with no ``--upstream``, the
    embedded demo server, which it stops on shutdown.

    Stopping takes two steps: `drain` (SIGTERM: not ready any more, open streams and
    running answers may finish) and `shutdown` (the rest are told and closed).
    """

    def __init__(self, settings: Settings) -> None:
        upstream_url = settings.upstream
        self.demo: demo.DemoServer | None = None
        if upstream_url is None:
            self.demo = demo.DemoServer(settings.demo_token_delay)
            upstream_url = self.demo.url
            # Its secret is the one key sent to it (never a key meant for a real model server).
            settings = dataclasses.replace(settings, api_keys=(self.demo.secret,))
        # --max-streams as the descriptor limit allows (and raised to its hard limit).
        upstream = upstream_descriptors(self.demo is not None)
        fitting = fit_descriptors(settings.max_streams, upstream)
        settings = dataclasses.replace(settings, max_streams=fitting)
        self.settings = settings
        self.client_address = ClientAddress(parse_networks(settings.trusted_proxies))
        self.metrics = Metrics()
        self.store = make_store(settings)
        self.upstream = Upstream(settings, upstream_url, self.metrics)
        self.streams: set[Watched] = set()
        self.readers = Readers()  # the keyed stream reading each answer here
        self.graces = Graces(self.store, settings.resume_grace)
        if not isinstance(self.store, MemoryStore):
            self.store.on_takeover = self.readers.taken_elsewhere
        self.draining = False
        self.rate = RateLimiter(settings.rate_limit)
        ledger = self.store.ledger
        self.shared_limits = shared = shared_limits(settings, self.store)
        if shared is not None:
            ledger.answer_ended = shared.ended
            self.metrics.limits_local.set_function(lambda: float(shared.local))
        self.admission = Admission(settings, ledger, self.rate, self.metrics, self.shared_limits)
        self.metrics.bind(
            streams=lambda: len(self.streams),
            sessions=lambda: len(self.store),
            cooling=self.upstream.keys.cooling,
            slots=lambda: ledger.slots,
            answers=lambda: len(self.upstream.calls),
            kept_bytes=lambda: ledger.kept_bytes,
            evicted=lambda: self.store.evicted,
        )
        self._tick = PeriodicCallback(self._check, watchdog_interval(settings) * 1000)
        self._prune = PeriodicCallback(self.prune, settings.prune_interval * 1000)

    def start(self) -> None:
        self.store.start()
        if self.shared_limits is not None:
            self.shared_limits.start()
        self._tick.start()
        self._prune.start()

    def prune(self) -> None:
        self.rate.prune()
        removed = self.store.prune()
        if removed:
            log.info("pruned %d expired sessions", removed)

    def _check(self) -> None:
        now = time.monotonic()
        self.upstream.check(now)
        late = self.store.cancel_unattached(now, self.settings.attach_grace)
        if late:
            self.metrics.not_attached.inc(late)
            log.info("cancelled %d answers no client attached to", late)
        for stream in list(self.streams):
            stream.check(now)

    async def not_ready(self) -> RelayError | None:
        """Why a balancer should send this process no new requests now (``GET /readyz``)."""
        if self.draining:
            return RelayError(503, "draining", "the server is shutting down")
        if not await self.store.reachable():
            return RelayError(503, "store_unavailable", "the session store is unreachable")
        return None

    async def drain(self, timeout: float, stop_now: asyncio.Event) -> None:
        """Mark the process not ready, then wait up to ``timeout`` seconds (or until
        ``stop_now`` is set) for open streams and running answers to end.

        Everything is served as usual meanwhile, new answers too: a balancer may send
        requests for a moment after its probe saw ``/readyz`` fail.
        """
        self.draining = True
        if not self._busy():
            return
        log.info(
            "draining: %d streams open, %d answers running; up to %g s (SIGINT: at once)",
            len(self.streams),
            len(self.upstream.calls),
            timeout,
        )
        deadline = time.monotonic() + timeout
        while self._busy() and not stop_now.is_set() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self._busy():
            log.info("drain over with %d streams still open", len(self.streams))

    def _busy(self) -> bool:
        # Running answers count even with no stream here: a reader may follow one through
        # Redis from another process, or reconnect to it here.
        return bool(self.streams or self.upstream.calls)

    async def shutdown(self, grace: float = 5.0) -> None:
        """Tell open streams (``event: error`` code ``shutdown``), cancel upstream calls."""
        self._prune.stop()
        for session in self.store:
            session.cancel(RelayError(503, "shutdown", "the server is shutting down"))
        deadline = time.monotonic() + grace
        while self.streams and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        self._tick.stop()
        self.graces.close()
        self.upstream.close()
        if self.demo is not None:
            await self.demo.close()
        if self.shared_limits is not None:
            await self.shared_limits.close()
        await self.store.close()


class RelayApplication(Application):
    """Tornado's access line for every request but event streams, which log a
    richer one of their own when they end (one line per request, not two).

    A session uid is a capability, so a log line shows only its first 8 characters:
    any run of 16 or more hex digits in the URI is cut to its first 8 and ``…``.

    ``relay`` is what every handler shares (`relay.handlers.BaseHandler.relay`).
    """

    def __init__(self, relay: Relay, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.relay = relay

    def find_handler(self, request: HTTPServerRequest, **kwargs: Any) -> _HandlerDelegate:
        # The first thing that sees a request: from here on, for the rate limit, the
        # per-address cap and the logs, the client is who the trusted proxies name.
        request.remote_ip = self.relay.client_address(request.remote_ip or "", request.headers)
        return super().find_handler(request, **kwargs)

    def log_request(self, handler: RequestHandler) -> None:
        if getattr(handler, "end_logged", False):
            return
        status = handler.get_status()
        if status < 400:
            log_method = access_log.info
        elif status < 500:
            log_method = access_log.warning
        else:
            log_method = access_log.error
        request = handler.request
        log_method(
            "%d %s %s (%s) %.2fms",
            status,
            request.method,
            _HEX_RUN.sub(r"\1…", request.uri or ""),
            request.remote_ip,
            1000.0 * request.request_time(),
        )


def make_store(settings: Settings) -> MemoryStore | RedisStore:
    """The session store ``--store`` names: in memory (default) or Redis (one, behind
    Sentinel, or a cluster)."""
    kept = settings.max_kept_mib << 20
    if settings.store != "memory":
        from relay.redis_store import RedisStore  # redis is only imported when used

        return RedisStore(settings.store, settings.session_ttl, max_kept_bytes=kept)
    return MemoryStore(settings.session_ttl, max_kept_bytes=kept)


def shared_limits(settings: Settings, store: MemoryStore | RedisStore) -> SharedLimits | None:
    """With a Redis store and a limit that counts per client, the limits count in Redis
    (relay/shared_limits.py)."""
    if isinstance(store, MemoryStore):
        return None
    # The caps Admission applies: per user with --auth-tokens, else per address.
    cap = (
        settings.max_answers_per_user if settings.auth_tokens else settings.max_answers_per_address
    )
    if not (settings.rate_limit or cap):
        return None
    from relay.shared_limits import SharedLimits

    return SharedLimits(store.redis, settings.rate_limit)


def make_app(settings: Settings) -> RelayApplication:
    """Build the Tornado application; with no ``--upstream`` its `Relay` also starts the
    embedded demo upstream, on a loopback port of its own (relay/demo.py)."""
    relay = Relay(settings)
    routes = [
        (r"/", handlers.IndexHandler),
        (r"/aianswer/robots", handlers.RobotsHandler),
        (r"/aianswer/streamAsk", streamask.StreamAskHandler),
        (r"/aianswer/sessions", handlers.SessionsHandler),
        (r"/aianswer/sessions/([0-9a-f]{32})", handlers.SessionHandler),
        (r"/aianswer/stream/([0-9a-f]{32})", eventstream.SessionStreamHandler),
        (r"/healthz", handlers.HealthHandler),
        (r"/readyz", handlers.ReadyHandler),
        (r"/metrics", handlers.MetricsHandler),
    ]
    app = RelayApplication(
        relay,
        routes,
        default_handler_class=handlers.NotFoundHandler,
        static_path=os.fspath(STATIC_DIR),
        static_handler_class=handlers.StaticHandler,
    )
    relay.start()
    return app


def watchdog_interval(settings: Settings) -> float:
    """Seconds between watchdog ticks: a quarter of the shortest timeout, within [20 ms, 1 s].

    Every tick visits every open stream and upstream call (~10 ms at 8,000
    streams), so with the defaults a heartbeat or timeout fires up to 1 s late
    rather than the loop paying that pass four times a second.
    """
    shortest = min(
        settings.heartbeat,
        settings.attach_grace,
        settings.upstream_idle_timeout,
        settings.upstream_timeout,
        settings.send_timeout,
    )
    return min(max(shortest / 4, 0.02), 1.0)
