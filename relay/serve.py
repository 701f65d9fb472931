"""Running the server: sockets, logging, the descriptor budget, workers and signals.

With ``--workers=N`` (0 = one per core) the parent binds N listening sockets
on the same port with SO_REUSEPORT, so the kernel spreads new connections
evenly, forks one worker per socket and supervises them: a worker that dies is
restarted; SIGTERM or SIGINT is passed on to every worker, and the parent exits
0 when they all have. Workers share sessions through the Redis store (config
validation refuses ``--workers`` with the memory store).

Stopping: SIGTERM drains first (``/readyz`` answers 503 while open streams and
running answers get up to ``--drain-timeout`` seconds to end, everything still
served), then shuts down: stop accepting, tell the streams left (``event: error``
code ``shutdown``), close, exit 0. SIGINT, also during a drain, shuts down at once.

Garbage collection: CPython's automatic full collections scan every live
object, and with thousands of open streams (~160 tracked objects each) one
pass stops the loop for hundreds of milliseconds, every time a quarter of the
heap is new. A stream leaves no reference cycles behind (tests pin that), so
the server turns automatic full passes off, freezes what startup allocated,
and runs one full pass per ``--prune-interval`` instead; young-generation
collections run as usual.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Coroutine, Sequence
from typing import Any

from tornado.ioloop import PeriodicCallback
from tornado.netutil import bind_sockets

from relay.app import make_app
from relay.config import Settings, help_text, load_settings
from relay.connections import make_http_server
from relay.errors import ConfigError

log = logging.getLogger("relay")


def self_url(host: str, port: int) -> str:
    """Where this server reaches itself: loopback when it listens on every address."""
    if host in ("", "0.0.0.0", "::"):  # noqa: S104 - recognising it, not binding to it
        host = "127.0.0.1"
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def main(argv: Sequence[str] | None = None) -> int:
    """The command line (``tornado-llm-relay``, ``python -m relay``, ``python server.py``)."""
    args = sys.argv[1:] if argv is None else argv
    # Before anything is loaded: help must work whatever else is wrong.
    if "--help" in args or "-h" in args:
        print(help_text(), end="")
        return 0
    try:
        settings = load_settings(args)
    except ConfigError as e:
        print(f"relay: {e}", file=sys.stderr)
        return 2
    return run(settings)


def run(settings: Settings) -> int:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s"
    )
    workers = settings.workers or os.cpu_count() or 1
    if workers == 1:
        return _run_loop(_serve(settings, _bind(settings.port, settings.host)))
    first = _bind(settings.port, settings.host, reuse_port=True)
    port = first[0].getsockname()[1]
    groups = [first] + [_bind(port, settings.host, reuse_port=True) for _ in range(workers - 1)]
    return _supervise(dataclasses.replace(settings, port=port), groups)


def _run_loop(main: Coroutine[Any, Any, int]) -> int:
    """Run on uvloop when it is installed (it makes the loop and its sockets cheaper)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)


def _bind(port: int, host: str, reuse_port: bool = False) -> list[socket.socket]:
    # A deep accept queue: thousands of streams may connect within a second
    # (Tornado's default backlog is 128; the kernel caps it at somaxconn).
    return bind_sockets(port, host, backlog=4096, reuse_port=reuse_port)


def _supervise(settings: Settings, groups: list[list[socket.socket]]) -> int:
    children: dict[int, int] = {}  # pid -> worker index
    stopping = False

    def spawn(index: int) -> None:
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                for other, sockets in enumerate(groups):
                    if other != index:
                        for sock in sockets:
                            sock.close()
                code = _run_loop(_serve(settings, groups[index]))
            finally:
                os._exit(code)
        children[pid] = index

    def stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True
        for pid in children:
            os.kill(pid, signum)  # the same signal: SIGTERM drains, SIGINT does not

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    for index in range(len(groups)):
        spawn(index)
    log.info("started %d workers on port %d", len(groups), settings.port)
    while children:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            break
        index = children.pop(pid)
        if not stopping:
            log.warning("worker %d (pid %d) exited with %d; restarting", index, pid, status)
            spawn(index)
        else:
            # Not restarted, so close this copy of its socket too: while any process holds
            # it, the kernel goes on giving it a share of new connections that nobody
            # accepts, while the other workers still drain.
            for sock in groups[index]:
                sock.close()
    return 0


async def _serve(settings: Settings, sockets: list[socket.socket]) -> int:
    port = sockets[0].getsockname()[1]
    app = make_app(settings)
    server = make_http_server(app)
    server.add_sockets(sockets)
    relay = app.relay
    upstream = settings.upstream or f"the embedded demo at {relay.upstream.url}"
    log.info("relay listening on %s, upstream %s", self_url(settings.host, port), _safe(upstream))
    manual_full_collections()
    collector = PeriodicCallback(_collect, settings.prune_interval * 1000)
    collector.start()

    # SIGTERM (an orchestrator's stop): drain first. SIGINT (Ctrl-C), also during a drain:
    # shut down at once.
    stop, stop_now = asyncio.Event(), asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, lambda: _set(stop_now, stop))
    await stop.wait()
    if not stop_now.is_set():
        await relay.drain(settings.drain_timeout, stop_now)
    log.info("shutting down")
    collector.stop()
    server.stop()
    await relay.shutdown()
    await server.close_all_connections()
    return 0


# Above any count gen 1 reaches between two manual passes: automatic full
# collections never run.
NO_AUTOMATIC_FULL = 1 << 30
# Young collections every 20,000 net allocations instead of CPython's 700: objects of a
# stream mostly die by reference count within a few hundred allocations, and fewer young
# passes promote fewer of them to be scanned again. -3.5% CPU per event under churn
# (docs/perf-changelog.md); 100,000 paid no more.
YOUNG = 20_000


def manual_full_collections() -> None:
    """Freeze the objects startup made and turn automatic full collections off."""
    gc.freeze()
    _, middle, _ = gc.get_threshold()
    gc.set_threshold(YOUNG, middle, NO_AUTOMATIC_FULL)


def full_collection() -> int:
    """One full pass (it stops the loop for as long as it scans); logged with its cost."""
    started = time.perf_counter()
    found = gc.collect()
    took = time.perf_counter() - started
    level = logging.WARNING if took > 0.1 else logging.DEBUG
    log.log(level, "full GC pass: %.0f ms, %d unreachable objects", took * 1000, found)
    return found


def _collect() -> None:
    full_collection()


def _set(*events: asyncio.Event) -> None:
    for event in events:
        event.set()


def _safe(url: str) -> str:
    """The URL without any user:password part, for the log."""
    scheme, sep, rest = url.partition("://")
    if sep and "@" in rest.split("/", 1)[0]:
        rest = rest.split("@", 1)[1]
    return f"{scheme}{sep}{rest}"
