"""Running the server: sockets, logging, the descriptor limit and signals."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import signal

from tornado.httpserver import HTTPServer
from tornado.netutil import bind_sockets

from relay.app import make_app
from relay.config import Settings
from relay.limits import fit_descriptors

log = logging.getLogger("relay")


def self_url(host: str, port: int) -> str:
    """Where this server reaches itself: loopback when it listens on every address."""
    if host in ("", "0.0.0.0", "::"):
        host = "127.0.0.1"
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def run(settings: Settings) -> int:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    return asyncio.run(_serve(settings))


async def _serve(settings: Settings) -> int:
    settings = dataclasses.replace(settings, max_streams=fit_descriptors(settings.max_streams))
    sockets = bind_sockets(settings.port, settings.host)
    port = sockets[0].getsockname()[1]
    app = make_app(settings, self_url(settings.host, port))
    server = HTTPServer(app, idle_connection_timeout=75)
    server.add_sockets(sockets)
    relay = app.settings["relay"]
    upstream = settings.upstream or "the embedded demo"
    log.info(
        "relay listening on %s, upstream %s",
        self_url(settings.host, port),
        _safe(upstream),
    )

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("shutting down")
    server.stop()
    await relay.shutdown()
    await server.close_all_connections()
    return 0


def _safe(url: str) -> str:
    """The URL without any user:password part, for the log."""
    scheme, sep, rest = url.partition("://")
    if sep and "@" in rest.split("/", 1)[0]:
        rest = rest.split("@", 1)[1]
    return f"{scheme}{sep}{rest}"
