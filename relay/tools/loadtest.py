"""Load tester for the relay: hold N concurrent SSE streams for a while and measure them.

    python -m relay.tools.loadtest --url=http://127.0.0.1:8888 --streams=1000 --duration=30 --ramp=5

N stream "slots" start evenly over ``--ramp`` seconds; each runs one stream after
another (one-shot ``POST /aianswer/streamAsk``, or the session flow POST, GET,
DELETE) until ``--duration`` is over, so concurrency stays at N. Streams still
running then finish (bounded by ``--timeout``) and the run stops by itself.
Measured: time to first event, gaps between events, lag (arrival time minus the
upstream's send time, from the ``"t"`` field that `relay.tools.fakeupstream` puts
first in every chunk), events/s, bytes, errors by kind, text exactness on a
sample of streams, and the load generator's own CPU, so a saturated generator
is not mistaken for a slow relay. See docs/loadtest.md for every flag and number.

Why it is built this way: the generator must cost far less per event than the
relay. So each connection is a bare `asyncio.Protocol` with its own small
HTTP/1.1 response parser (chunked, Content-Length or until-close bodies) that
hands each socket read to `relay.sse.SSEParser` in one piece; a read is
timestamped once; the ``t`` field is read with a prefix check, not a JSON parse
(only sampled streams are parsed, for the text check); latencies go into
fixed-size log histograms (1% precision) that merge across processes; one
1-second ticker per process checks timeouts and prints progress: no timer per
event (only a connect timeout per new connection). ``--processes`` splits the slots across worker
processes when one core is not enough.

Only loopback hosts are accepted unless ``--allow-host`` names the host.
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import json
import math
import multiprocessing
import os
import queue
import resource
import signal
import socket
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from multiprocessing.context import SpawnContext, SpawnProcess
from typing import Any, cast
from urllib.parse import urlsplit

import ujson

from relay.http1 import ProtocolError, ResponseParser
from relay.limits import raise_fd_limit
from relay.sse import SSEParser
from relay.tools.fakeupstream import expected_text, is_loopback

__all__ = ["Histogram", "LoadConfig", "Stats", "build_result", "main", "run", "run_async"]

MODES = ("oneshot", "session", "upstream")
ERROR_PAUSE = 0.1  # seconds a slot waits after a failed stream, so errors cannot spin
MAX_ERROR_BODY = 4 << 10
MAX_EXAMPLES = 3
SATURATED = 90.0  # percent of a core at which a generator process is called saturated


# -- histograms ---------------------------------------------------------------------------


class Histogram:
    """Positive values (seconds, or rates), in log buckets 1% wide from 1e-6 to ~1e6.

    A negative value (a clock step) counts in the lowest bucket and shows as ``min``.
    Percentiles are the upper edge of the bucket holding the nearest-rank
    sample (at most 1% high) capped at the exact maximum; count, sum, min and
    max are exact. Fixed size, so millions of samples cost no memory and
    workers' histograms merge by adding counts.
    """

    __slots__ = ("counts", "max", "min", "n", "total")
    _K = 1 / math.log1p(0.01)
    _SIZE = 2800  # 1e-6 * 1.01**2800 ~ 1.2e6; larger values land in the last bucket

    def __init__(self) -> None:
        self.counts = [0] * self._SIZE
        self.n = 0
        self.total = 0.0
        self.min = math.inf
        self.max = 0.0

    def add(self, value: float) -> None:
        self.n += 1
        self.total += value
        if value > self.max or value < self.min:  # rare: compare before calling min/max
            self.min = min(self.min, value)
            self.max = max(self.max, value)
        i = int(math.log(value * 1e6) * self._K) + 1 if value > 1e-6 else 0
        self.counts[i if i < self._SIZE else self._SIZE - 1] += 1

    def merge(self, other: Histogram) -> None:
        self.counts = [a + b for a, b in zip(self.counts, other.counts, strict=True)]
        self.n += other.n
        self.total += other.total
        self.min = min(self.min, other.min)
        self.max = max(self.max, other.max)

    def percentile(self, q: float) -> float:
        """The q-quantile (0 < q <= 1) by nearest rank; 0.0 when empty."""
        if not self.n:
            return 0.0
        rank = max(1, math.ceil(q * self.n))
        seen = 0
        for i, count in enumerate(self.counts):
            seen += count
            if seen >= rank:
                upper = 1e-6 * math.exp(i / self._K) if i else 1e-6
                return max(self.min, min(upper, self.max))
        return self.max

    def summary(self) -> dict[str, float | int]:
        """count, mean, min, p50, p90, p99, max, rounded to 1e-6 (a microsecond)."""
        if not self.n:
            return {"count": 0}
        values = {
            "mean": self.total / self.n,
            "min": self.min,
            "p50": self.percentile(0.50),
            "p90": self.percentile(0.90),
            "p99": self.percentile(0.99),
            "max": self.max,
        }
        return {"count": self.n} | {key: round(value, 6) for key, value in values.items()}


# -- configuration and results -------------------------------------------------------------


@dataclass(frozen=True)
class LoadConfig:
    """One run. Times are in seconds."""

    url: str
    streams: int = 10
    duration: float = 10.0
    ramp: float = 1.0
    mode: str = "oneshot"
    processes: int = 1
    expect_tokens: int | None = None
    sample: float = 0.1
    timeout: float = 60.0
    idle_timeout: float = 30.0
    question: str = "你好"
    robot_id: str = "1"
    token: str | None = None
    keepalive: bool = True
    keep_sessions: bool = False
    allow_hosts: tuple[str, ...] = ()
    watch_pids: tuple[int, ...] = ()
    quiet: bool = False


@dataclass
class ProcessCPU:
    """CPU one load-generator process used over the run (getrusage deltas)."""

    pid: int
    role: str
    user_s: float
    sys_s: float
    wall_s: float

    @classmethod
    def since(cls, before: resource.struct_rusage, role: str, wall_s: float) -> ProcessCPU:
        """This process's CPU since ``before`` (a getrusage of it), over ``wall_s`` seconds."""
        now = resource.getrusage(resource.RUSAGE_SELF)
        user, system = now.ru_utime - before.ru_utime, now.ru_stime - before.ru_stime
        return cls(os.getpid(), role, user, system, wall_s)

    @property
    def percent_of_core(self) -> float:
        return 100.0 * (self.user_s + self.sys_s) / self.wall_s if self.wall_s > 0 else 0.0


@dataclass
class Stats:
    """What one worker measured; `merge` adds another worker's."""

    started: int = 0
    completed: int = 0
    failed: int = 0
    events: int = 0
    steady_events: int = 0
    bytes: int = 0
    connections: int = 0
    max_active: int = 0
    steady_window: float = 0.0
    sampled: int = 0
    checked: int = 0
    exact: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)
    ttft: Histogram = field(default_factory=Histogram)
    gap: Histogram = field(default_factory=Histogram)
    lag: Histogram = field(default_factory=Histogram)
    connect: Histogram = field(default_factory=Histogram)
    stream: Histogram = field(default_factory=Histogram)
    rate: Histogram = field(default_factory=Histogram)
    cpu: list[ProcessCPU] = field(default_factory=list)

    def merge(self, other: Stats) -> None:
        for name in (
            "started",
            "completed",
            "failed",
            "events",
            "steady_events",
            "bytes",
            "connections",
            "max_active",
            "sampled",
            "checked",
            "exact",
        ):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.steady_window = max(self.steady_window, other.steady_window)
        self.errors.update(other.errors)
        self.examples = (self.examples + other.examples)[:MAX_EXAMPLES]
        for name in ("ttft", "gap", "lag", "connect", "stream", "rate"):
            getattr(self, name).merge(getattr(other, name))
        self.cpu += other.cpu


# -- a minimal HTTP/1.1 client connection ----------------------------------------------------


class _Failure(Exception):
    """A request that failed; ``kind`` is the error's key in the report."""

    def __init__(self, kind: str) -> None:
        super().__init__(kind)
        self.kind = kind


class _Sink:
    """Receives one response: its status and headers, then its body as it arrives."""

    status = 0

    def head(self, status: int, headers: dict[str, str]) -> None:
        self.status = status

    def body(self, data: bytes, now: float) -> None:
        raise NotImplementedError


class _Collect(_Sink):
    """Keeps a small body (JSON answers and error bodies)."""

    def __init__(self) -> None:
        self.data = bytearray()

    def body(self, data: bytes, now: float) -> None:
        if len(self.data) < MAX_ERROR_BODY:
            self.data += data[: MAX_ERROR_BODY - len(self.data)]


class _Connection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection that runs one request at a time.

    Each socket read is timestamped once and its body bytes (de-chunked by
    `relay.http1.ResponseParser`) go to the sink in one call.
    """

    transport: asyncio.Transport  # set by connection_made

    def __init__(self, stats: Stats) -> None:
        self.stats = stats  # its ``bytes`` counts everything received, headers and framing too
        self.closed = False
        self._parser: ResponseParser | None = None  # None between requests
        self._sink: _Sink = _Collect()
        self._future: asyncio.Future[bool] | None = None
        self._keep_alive = True

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def request(self, request: bytes, sink: _Sink) -> asyncio.Future[bool]:
        """Send a request; the future resolves when the whole response is in.

        Its result says whether the connection can be reused; it raises
        `_Failure` (``no_response`` or ``incomplete``) if the connection ends first.
        """
        self._sink = sink
        self._parser = ResponseParser()
        self._future = asyncio.get_running_loop().create_future()
        self.transport.write(request)
        return self._future

    def close(self) -> None:
        self.closed = True
        self.transport.close()

    def abort(self) -> None:
        self.closed = True
        self.transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        parser = self._parser
        if parser is not None and parser.until_close:
            self._done()
        elif self._future is not None and not self._future.done():
            self._future.set_exception(
                _Failure("no_response" if parser is None or parser.head is None else "incomplete")
            )

    def data_received(self, data: bytes) -> None:
        now = time.time()
        self.stats.bytes += len(data)
        parser = self._parser
        if parser is None:
            self._protocol_error()  # bytes after the response: nobody asked for them
            return
        try:
            seen = parser.head is not None
            body = parser.feed(data)
        except ProtocolError:
            self._protocol_error()
            return
        if not seen and parser.head is not None:
            head = parser.head
            self._keep_alive = head.keep_alive and not parser.until_close
            self._sink.head(head.status, head.headers)
        if body:
            self._sink.body(body, now)
        if parser.done:
            if parser.extra:
                self._protocol_error()
            else:
                self._done()

    def _done(self) -> None:
        self._parser = None
        if not self._keep_alive and not self.closed:
            self.close()
        if self._future is not None and not self._future.done():
            self._future.set_result(self._keep_alive)

    def _protocol_error(self) -> None:
        self._parser = None
        if self._future is not None and not self._future.done():
            self._future.set_exception(_Failure("bad_response"))
        self.abort()


# -- one stream -------------------------------------------------------------------------------


class _StreamRun(_Sink):
    """One stream: consumes its event stream and keeps what the report needs.

    ``body`` is the per-read hot path: parse events, count them, add a gap and
    a lag per event. The text of a sampled stream is checked when it ends.
    """

    def __init__(self, worker: _Worker, sampled: bool) -> None:
        self.worker = worker
        self.start = time.time()
        self.deadline = self.start + worker.cfg.timeout
        self.last_rx = self.start
        self.connection: _Connection | None = None
        self.abort_kind = ""  # set by the ticker when it cuts the stream
        self.error_kind = ""  # from an `event: error`
        self.error_body = _Collect()
        self.parser = SSEParser()
        self.check_ids = worker.cfg.mode != "upstream"
        self.seq = 0
        self.bad_seq = False
        self.events = 0
        self.first_at = 0.0
        self.last_at = 0.0
        self.done_at = 0.0
        self.texts: list[str] | None = [] if sampled else None

    def head(self, status: int, headers: dict[str, str]) -> None:
        self.status = status
        self.last_rx = time.time()

    def body(self, data: bytes, now: float) -> None:
        self.last_rx = now
        if self.status != 200:
            self.error_body.body(data, now)
            return
        worker = self.worker
        stats = worker.stats
        for event in self.parser.feed(data):
            if event.event != "message":
                if event.event == "error" and not self.error_kind:
                    self.error_kind = "event_error:" + _error_code(event.data)
                continue
            data_text = event.data
            if self.check_ids:
                self.seq += 1
                if event.id != str(self.seq):
                    self.bad_seq = True
            if data_text == "[DONE]":
                self.done_at = now
                continue
            self.events += 1
            stats.events += 1
            if worker.steady_from <= now < worker.steady_to:
                stats.steady_events += 1
            if self.first_at:
                stats.gap.add(now - self.last_at)
            else:
                self.first_at = now
                stats.ttft.add(now - self.start)
            self.last_at = now
            if data_text.startswith('{"t":'):
                end = data_text.find(",", 5)
                try:
                    stats.lag.add(now - float(data_text[5:end]))
                except ValueError:
                    pass
            if self.texts is not None:
                self.texts.append(data_text)

    def outcome(self, failure: str) -> str:
        """The error kind this stream ended with, or "" if it completed."""
        if self.abort_kind:
            return self.abort_kind
        if self.status and self.status != 200:
            return f"http:{self.status}:{_error_code(bytes(self.error_body.data))}"
        if self.error_kind:
            return self.error_kind
        if not self.done_at:
            return failure or "incomplete"
        if self.bad_seq:
            return "bad_sequence"
        return ""


def _error_code(body: str | bytes) -> str:
    """The ``error.code`` of a relay error body, else "unknown"."""
    try:
        code = ujson.loads(body)["error"]["code"]
    except (ValueError, KeyError, TypeError):
        return "unknown"
    return str(code)


def _text_of(chunks: list[str]) -> str:
    """The answer text: every chunk's first-choice ``delta.content``, joined."""
    out = []
    for data in chunks:
        choices = ujson.loads(data).get("choices") or [{}]
        content = (choices[0].get("delta") or {}).get("content")
        if isinstance(content, str):
            out.append(content)
    return "".join(out)


def _first_difference(got: str, want: str) -> str:
    at = next(
        (i for i, (a, b) in enumerate(zip(got, want, strict=False)) if a != b),
        min(len(got), len(want)),
    )
    return (
        f"text differs at character {at} (got {len(got)} chars, expected {len(want)}): "
        f"got {got[at : at + 20]!r}, expected {want[at : at + 20]!r}"
    )


# -- one worker (one process) -------------------------------------------------------------------


@dataclass(frozen=True)
class _Target:
    """Where requests go, resolved once."""

    address: tuple[str, int]
    host_header: str
    base_path: str


def resolve_target(cfg: LoadConfig) -> _Target:
    """Check the URL (http, loopback unless allowed) and resolve its host once."""
    parts = urlsplit(cfg.url)
    if parts.scheme != "http" or not parts.hostname:
        raise ValueError(f"--url must be an http:// URL with a host, not {cfg.url!r}")
    host = parts.hostname
    port = parts.port or 80
    allowed = host in {name.lower() for name in cfg.allow_hosts}
    if not allowed and not is_loopback(host):
        raise ValueError(
            f"refusing to load {host!r}: only loopback hosts, unless --allow-host={host}"
        )
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    address = infos[0][4][:2]
    if not allowed and not is_loopback(address[0]):
        raise ValueError(f"{host!r} resolves to {address[0]}, which is not loopback")
    return _Target(address, parts.netloc, parts.path.rstrip("/"))


class _Worker:
    """Runs ``n`` slots in this process's event loop and collects their `Stats`."""

    def __init__(
        self,
        cfg: LoadConfig,
        n: int,
        report: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        self.cfg = cfg
        self.n = n
        self.report = report
        self.target = resolve_target(cfg)
        self.stats = Stats()
        self.active: set[_StreamRun] = set()
        self.expected = None if cfg.expect_tokens is None else expected_text(cfg.expect_tokens)
        self.period = round(1 / cfg.sample) if cfg.sample > 0 else 0
        self.steady_from = self.steady_to = self.end = 0.0
        headers = f"Host: {self.target.host_header}\r\nUser-Agent: relay-loadtest\r\n"
        if cfg.token:
            headers += f"Authorization: Bearer {cfg.token}\r\n"
        if not cfg.keepalive:
            headers += "Connection: close\r\n"
        self._headers = headers
        self._start = self._first_request()

    def _first_request(self) -> bytes:
        """The POST that starts every stream (the same bytes each time)."""
        cfg = self.cfg
        if cfg.mode == "upstream":
            path = "/chat/completions"
            doc: dict[str, Any] = {
                "model": "loadtest",
                "stream": True,
                "messages": [{"role": "user", "content": cfg.question}],
            }
        else:
            path = "/aianswer/sessions" if cfg.mode == "session" else "/aianswer/streamAsk"
            doc = {"robotId": cfg.robot_id, "aiQuestion": cfg.question}
        body = json.dumps(doc, ensure_ascii=False).encode()
        head = (
            f"POST {self.target.base_path}{path} HTTP/1.1\r\n{self._headers}"
            f"Content-Type: application/json\r\nAccept: text/event-stream\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        )
        return head.encode() + body

    def _request(self, method: str, path: str) -> bytes:
        return (
            f"{method} {path} HTTP/1.1\r\n{self._headers}Accept: text/event-stream\r\n\r\n".encode()
        )

    async def run(self) -> Stats:
        cfg = self.cfg
        t0 = time.time()
        self.end = t0 + cfg.duration
        self.steady_from = t0 + cfg.ramp if cfg.ramp < cfg.duration else t0
        self.steady_to = self.end
        self.stats.steady_window = self.steady_to - self.steady_from
        cpu0 = resource.getrusage(resource.RUSAGE_SELF)
        ticker = asyncio.ensure_future(self._tick(t0, time.process_time()))
        slots = []
        for i in range(self.n):
            delay = t0 + cfg.ramp * i / self.n - time.time()
            if delay > 0:
                await asyncio.sleep(delay)
            if time.time() >= self.end:
                break
            slots.append(asyncio.ensure_future(self._slot()))
        await asyncio.gather(*slots)
        ticker.cancel()
        self.stats.cpu.append(ProcessCPU.since(cpu0, "worker", time.time() - t0))
        return self.stats

    async def _tick(self, t0: float, cpu0: float) -> None:
        """Once a second: cut streams past their deadlines, report progress."""
        cfg = self.cfg
        while True:
            await asyncio.sleep(1.0 - (time.time() - t0) % 1.0)
            now = time.time()
            for run in list(self.active):
                kind = ""
                if now > run.deadline:
                    kind = "timeout"
                elif now - run.last_rx > cfg.idle_timeout:
                    kind = "idle_timeout"
                if kind and run.connection is not None:
                    run.abort_kind = kind
                    run.connection.abort()
            if self.report is not None:
                s = self.stats
                self.report(
                    {
                        "active": len(self.active),
                        "started": s.started,
                        "completed": s.completed,
                        "failed": s.failed,
                        "events": s.events,
                        "errors": sum(s.errors.values()),
                        "cpu": time.process_time() - cpu0,
                    }
                )

    async def _slot(self) -> None:
        connection: _Connection | None = None
        while time.time() < self.end:
            stats = self.stats
            sampled = bool(self.period) and stats.started % self.period == 0
            run = _StreamRun(self, sampled)
            stats.started += 1
            self.active.add(run)
            stats.max_active = max(stats.max_active, len(self.active))
            try:
                connection = await self._stream(run, connection)
                kind = run.outcome("")
            except _Failure as e:  # the connection is closed by now
                connection = None
                kind = run.outcome(e.kind)
            except (TimeoutError, OSError) as e:
                connection = None
                kind = "connect:" + _os_error_name(e)
            finally:
                self.active.discard(run)
            self._record(run, kind)
            if kind:
                await asyncio.sleep(ERROR_PAUSE)
        if connection is not None:
            connection.close()

    async def _connect(self, run: _StreamRun) -> _Connection:
        loop = asyncio.get_running_loop()
        t = time.time()
        _, connection = await asyncio.wait_for(
            loop.create_connection(lambda: _Connection(self.stats), *self.target.address),
            timeout=max(0.001, run.deadline - t),
        )
        self.stats.connections += 1
        self.stats.connect.add(time.time() - t)
        return connection

    async def _use(self, run: _StreamRun, connection: _Connection | None) -> _Connection:
        if connection is None or connection.closed:
            connection = await self._connect(run)
        run.connection = connection
        return connection

    async def _stream(self, run: _StreamRun, connection: _Connection | None) -> _Connection | None:
        """Run one stream; return the connection if it may be reused.

        Raises `_Failure` (its connection then closed), or OSError or TimeoutError
        from connecting.
        """
        try:
            connection = await self._use(run, connection)
            if self.cfg.mode != "session":
                return connection if await connection.request(self._start, run) else None
            created = _Collect()
            reusable = await connection.request(self._start, created)
            if created.status != 201:
                run.status = created.status
                run.error_body = created
                return connection if reusable else None
            try:
                doc = ujson.loads(bytes(created.data))
                stream_path, uid = self.target.base_path + doc["streamUrl"], doc["uid"]
            except (ValueError, KeyError, TypeError):
                connection.abort()
                raise _Failure("bad_response") from None
            connection = await self._use(run, connection if reusable else None)
            reusable = await connection.request(self._request("GET", stream_path), run)
            if self.cfg.keep_sessions or not run.done_at:
                return connection if reusable else None
            connection = await self._use(run, connection if reusable else None)
            deleted = _Collect()
            path = f"{self.target.base_path}/aianswer/sessions/{uid}"
            reusable = await connection.request(self._request("DELETE", path), deleted)
            if deleted.status != 204:
                self.stats.errors[f"delete:http:{deleted.status}"] += 1
            return connection if reusable else None
        finally:
            run.connection = None

    def _record(self, run: _StreamRun, kind: str) -> None:
        stats = self.stats
        if kind:
            stats.failed += 1
            stats.errors[kind] += 1
            return
        stats.completed += 1
        elapsed = run.done_at - run.start
        stats.stream.add(elapsed)
        if elapsed > 0:
            stats.rate.add(run.events / elapsed)
        if run.texts is None:
            return
        stats.sampled += 1
        try:
            text = _text_of(run.texts)
        except (ValueError, AttributeError, TypeError, IndexError):
            stats.errors["bad_chunk"] += 1
            self._example("a chunk is not chat.completion.chunk JSON")
            return
        if self.expected is None:
            return
        stats.checked += 1
        if text == self.expected:
            stats.exact += 1
        else:
            self._example(_first_difference(text, self.expected))

    def _example(self, message: str) -> None:
        if len(self.stats.examples) < MAX_EXAMPLES:
            self.stats.examples.append(message)


def _os_error_name(e: BaseException) -> str:
    if isinstance(e, TimeoutError):
        return "timeout"
    code = getattr(e, "errno", None)
    return errno.errorcode.get(code, type(e).__name__) if code else type(e).__name__


# -- running: in process, or across worker processes ---------------------------------------------


def _split(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


class _CPUWatch:
    """CPU time of other processes (the relay) from /proc/<pid>/stat, Linux only."""

    def __init__(self, pids: Sequence[int]) -> None:
        self.pids = list(pids)
        self.tick = os.sysconf("SC_CLK_TCK")
        self.start = {pid: self.read(pid) for pid in self.pids}
        self.last = dict(self.start)
        self.t0 = self.t_last = time.time()

    def read(self, pid: int) -> float:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            return math.nan
        return (int(fields[11]) + int(fields[12])) / self.tick  # utime + stime

    def recent(self) -> dict[int, float]:
        """Percent of a core each process used since the last call."""
        now = time.time()
        out = {}
        for pid in self.pids:
            cpu = self.read(pid)
            out[pid] = 100 * (cpu - self.last[pid]) / max(now - self.t_last, 1e-9)
            self.last[pid] = cpu
        self.t_last = now
        return out

    def totals(self) -> list[dict[str, Any]]:
        wall = time.time() - self.t0
        out = []
        for pid in self.pids:
            cpu = self.read(pid) - self.start[pid]
            out.append(
                {
                    "pid": pid,
                    "name": _process_name(pid),
                    "cpu_s": None if math.isnan(cpu) else round(cpu, 3),
                    "percent_of_core": None if math.isnan(cpu) else round(100 * cpu / wall, 1),
                }
            )
        return out


def _process_name(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()[:80]
    except OSError:
        return "?"


class _Progress:
    """The live line on stderr, from the latest snapshot of each worker."""

    def __init__(self, cfg: LoadConfig, watch: _CPUWatch) -> None:
        self.cfg = cfg
        self.watch = watch
        self.t0 = time.time()
        self.latest: dict[int, dict[str, Any]] = {}
        self.shown: dict[int, dict[str, Any]] = {}  # each worker's snapshot at the last line
        self.last_t = self.t0

    def update(self, worker: int, snapshot: dict[str, Any]) -> None:
        self.latest[worker] = snapshot

    def print_line(self) -> None:
        if self.cfg.quiet or not self.latest:
            return
        now = time.time()
        dt = max(now - self.last_t, 1e-9)
        zero = {"events": 0, "cpu": 0.0}
        rate = 0.0
        cpu = []  # percent of a core, per worker
        for worker, snap in self.latest.items():
            before = self.shown.get(worker, zero)
            rate += (snap["events"] - before["events"]) / dt
            cpu.append(100 * (snap["cpu"] - before["cpu"]) / dt)
        total = {
            key: sum(snap[key] for snap in self.latest.values())
            for key in ("active", "started", "completed", "failed", "errors")
        }
        self.shown, self.last_t = dict(self.latest), now
        line = (
            f"[{now - self.t0:6.1f}s] active {total['active']:>5}  started {total['started']:>6}"
            f"  done {total['completed']:>6}  failed {total['failed']:>4}"
            f"  events/s {rate:>8,.0f}  errors {total['errors']:>4}  loadgen cpu {sum(cpu):4.0f}%"
        )
        if len(cpu) > 1:
            line += f" (busiest {max(cpu):.0f}%)"
        for pid, pct in self.watch.recent().items():
            if not math.isnan(pct):
                line += f"  pid {pid} cpu {pct:4.0f}%"
        print(line, file=sys.stderr, flush=True)


async def run_async(cfg: LoadConfig) -> dict[str, Any]:
    """Run ``cfg`` in this process's event loop (``processes`` is ignored); the JSON result."""
    watch = _CPUWatch(cfg.watch_pids)
    progress = _Progress(cfg, watch)

    def report(snapshot: dict[str, Any]) -> None:
        progress.update(0, snapshot)
        progress.print_line()

    t0 = time.time()
    stats = await _Worker(cfg, cfg.streams, report).run()
    return build_result(cfg, stats, time.time() - t0, watch.totals())


def _process_main(
    cfg: LoadConfig, index: int, n: int, barrier: Any, out: multiprocessing.Queue
) -> None:
    """A worker process: run ``n`` slots, stream progress snapshots, then the `Stats`."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    raise_fd_limit()

    def report(snapshot: dict[str, Any]) -> None:
        out.put(("progress", index, snapshot))

    async def main() -> Stats:
        return await _Worker(cfg, n, report).run()

    try:
        barrier.wait(60)
        out.put(("stats", index, asyncio.run(main())))
    except Exception as e:  # noqa: BLE001 - the parent must hear why, not wait for a result
        out.put(("crash", index, f"{type(e).__name__}: {e}"))


def _run_processes(cfg: LoadConfig) -> dict[str, Any]:
    """Run ``cfg`` in ``cfg.processes`` worker processes and merge what they measured."""
    ctx = multiprocessing.get_context("spawn")
    out: multiprocessing.Queue = ctx.Queue()
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    procs = _start_workers(cfg, ctx, out)
    t0 = time.time()
    watch = _CPUWatch(cfg.watch_pids)
    stats = _gather(cfg, procs, out, _Progress(cfg, watch), t0)
    for proc in procs:
        proc.join(5)
        if proc.is_alive():
            proc.terminate()
    wall = time.time() - t0
    stats.cpu.append(ProcessCPU.since(cpu0, "parent", wall))
    return build_result(cfg, stats, wall, watch.totals())


def _start_workers(
    cfg: LoadConfig, ctx: SpawnContext, out: multiprocessing.Queue
) -> list[SpawnProcess]:
    """Start the workers and return once all of them are ready to run (a barrier), so the
    run's clock starts with every worker's."""
    barrier = ctx.Barrier(cfg.processes + 1)
    procs = [
        ctx.Process(target=_process_main, args=(cfg, i, n, barrier, out), daemon=True)
        for i, n in enumerate(_split(cfg.streams, cfg.processes))
    ]
    for proc in procs:
        proc.start()
    try:
        barrier.wait(60)
    except threading.BrokenBarrierError:
        for proc in procs:
            proc.terminate()
        raise RuntimeError("the worker processes did not start within 60 s") from None
    return procs


def _gather(
    cfg: LoadConfig,
    procs: list[SpawnProcess],
    out: multiprocessing.Queue,
    progress: _Progress,
    t0: float,
) -> Stats:
    """Read the workers' messages until each has sent its `Stats`, crashed, died or hung
    past the run's latest end; print the progress line once a second meanwhile."""
    stats = Stats()
    pending = set(range(cfg.processes))
    hard_stop = t0 + cfg.duration + cfg.timeout + 30
    next_line = t0 + 1.1  # just after the workers' once-a-second snapshots
    while pending and time.time() < hard_stop:
        try:
            kind, index, payload = out.get(timeout=max(0.01, next_line - time.time()))
        except queue.Empty:
            kind = ""
        if kind == "progress":
            progress.update(index, payload)
        elif kind == "stats":
            stats.merge(payload)
            pending.discard(index)
        elif kind == "crash":
            stats.errors[f"worker_crash:{payload}"] += 1
            pending.discard(index)
        if time.time() >= next_line:
            progress.print_line()
            next_line += 1.0
        for i in list(pending):
            if not procs[i].is_alive() and out.empty():
                stats.errors[f"worker_died:exit_{procs[i].exitcode}"] += 1
                pending.discard(i)
    for _ in pending:
        stats.errors["worker_hung"] += 1
    return stats


def run(cfg: LoadConfig) -> dict[str, Any]:
    """Run ``cfg`` to its end (in this process, or in ``cfg.processes`` workers)."""
    raise_fd_limit()
    if cfg.processes > 1:
        return _run_processes(cfg)
    return asyncio.run(run_async(cfg))


# -- the report ------------------------------------------------------------------------------------


def build_result(
    cfg: LoadConfig, stats: Stats, elapsed: float, watched: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    """The JSON result (documented in docs/loadtest.md)."""
    errors = sum(stats.errors.values())
    mismatched = stats.checked - stats.exact
    config = asdict(cfg)
    config["token"] = "***" if cfg.token else None
    return {
        "config": config,
        "elapsed_s": round(elapsed, 3),
        "streams": {
            "started": stats.started,
            "completed": stats.completed,
            "failed": stats.failed,
            "max_active": stats.max_active,
            "connections": stats.connections,
        },
        "events": _events_result(stats, elapsed),
        "ttft_s": stats.ttft.summary(),
        "gap_s": stats.gap.summary(),
        "lag_s": stats.lag.summary(),
        "connect_s": stats.connect.summary(),
        "stream_s": stats.stream.summary(),
        "stream_events_per_s": stats.rate.summary(),
        "errors": {"total": errors, "by_kind": dict(stats.errors.most_common())},
        "exactness": {
            "expected_tokens": cfg.expect_tokens,
            "sampled": stats.sampled,
            "checked": stats.checked,
            "exact": stats.exact,
            "mismatched": mismatched,
            "examples": stats.examples,
        },
        "cpu": _cpu_result(stats.cpu),
        "watched": watched or [],
        "ok": errors == 0 and mismatched == 0 and stats.completed > 0,
    }


def _events_result(stats: Stats, elapsed: float) -> dict[str, Any]:
    """Events and bytes; ``per_s`` over the window in which every slot ran."""
    window = stats.steady_window or elapsed
    return {
        "total": stats.events,
        "per_s": round(stats.steady_events / window, 1) if window > 0 else 0.0,
        "per_s_overall": round(stats.events / elapsed, 1) if elapsed > 0 else 0.0,
        "bytes": stats.bytes,
        "bytes_per_s": round(stats.bytes / elapsed, 1) if elapsed > 0 else 0.0,
    }


def _cpu_result(processes: list[ProcessCPU]) -> dict[str, Any]:
    """The generator's CPU per process, and whether a worker was saturated."""
    worst = max((p.percent_of_core for p in processes if p.role == "worker"), default=0.0)
    return {
        "processes": [
            {
                "pid": p.pid,
                "role": p.role,
                "user_s": round(p.user_s, 3),
                "sys_s": round(p.sys_s, 3),
                "wall_s": round(p.wall_s, 3),
                "percent_of_core": round(p.percent_of_core, 1),
            }
            for p in processes
        ],
        "total_s": round(sum(p.user_s + p.sys_s for p in processes), 3),
        "max_percent_of_core": round(worst, 1),
        "saturated": worst >= SATURATED,
    }


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.1f}"


def format_summary(result: dict[str, Any]) -> str:
    """The human summary printed at the end of a run."""
    lines = [
        *_run_lines(result),
        *_latency_lines(result),
        *_outcome_lines(result),
        *_cpu_lines(result),
        "OK" if result["ok"] else "NOT OK",
    ]
    return "\n".join(lines)


def _run_lines(result: dict[str, Any]) -> list[str]:
    """What was run, and how many streams and events it made."""
    c, s, e = result["config"], result["streams"], result["events"]
    return [
        (
            f"{c['mode']} {c['url']}: {c['streams']} streams for {c['duration']:g} s "
            f"(ramp {c['ramp']:g} s), {c['processes']} process(es), "
            f"{result['elapsed_s']:.1f} s in all"
        ),
        (
            f"streams   started {s['started']}, completed {s['completed']}, "
            f"failed {s['failed']}, max active {s['max_active']}, "
            f"connections {s['connections']}"
        ),
        (
            f"events    {e['total']:,} ({e['per_s']:,.0f}/s after the ramp, "
            f"{e['per_s_overall']:,.0f}/s overall), {e['bytes'] / 1e6:,.1f} MB"
        ),
    ]


def _latency_lines(result: dict[str, Any]) -> list[str]:
    """The percentile table: latencies in ms, then events/s per stream."""
    lines = [f"{'':22}{'p50':>9}{'p90':>9}{'p99':>9}{'max':>9}{'count':>10}"]
    for key, label in (
        ("ttft_s", "time to first event ms"),
        ("gap_s", "gap between events ms"),
        ("lag_s", "lag behind upstream ms"),
        ("connect_s", "connect ms"),
        ("stream_s", "stream duration ms"),
    ):
        h = result[key]
        lines.append(
            f"{label:<22}"
            + "".join(f"{_ms(h.get(q)):>9}" for q in ("p50", "p90", "p99", "max"))
            + f"{h['count']:>10}"
        )
    r = result["stream_events_per_s"]
    if r["count"]:
        lines.append(
            f"{'events/s per stream':<22}"
            + "".join(f"{r[q]:>9.1f}" for q in ("p50", "p90", "p99", "max"))
            + f"{r['count']:>10}"
        )
    return lines


def _outcome_lines(result: dict[str, Any]) -> list[str]:
    """Errors by kind, and whether the sampled text was exact."""
    err = result["errors"]
    kinds = ", ".join(f"{k} {n}" for k, n in err["by_kind"].items()) or "none"
    lines = [f"errors    {err['total']}: {kinds}"]
    x = result["exactness"]
    if x["checked"]:
        lines.append(
            f"exactness {x['exact']}/{x['checked']} sampled streams exact "
            f"({x['expected_tokens']} tokens expected)"
        )
    else:
        lines.append(f"exactness not checked ({x['sampled']} sampled; give --expect-tokens)")
    lines += [f"          {example}" for example in x["examples"]]
    return lines


def _cpu_lines(result: dict[str, Any]) -> list[str]:
    """The generator's CPU, each watched process's, and a warning when it was saturated."""
    cpu = result["cpu"]
    lines = [
        (
            f"cpu       load generator {cpu['total_s']:.1f} s, busiest process "
            f"{cpu['max_percent_of_core']:.0f}% of a core"
        )
    ]
    for w in result["watched"]:
        pct = w["percent_of_core"]
        lines.append(
            f"          pid {w['pid']} ({w['name']}): "
            + ("gone" if pct is None else f"{w['cpu_s']:.1f} s, {pct:.0f}% of a core")
        )
    if cpu["saturated"]:
        lines.append(
            "WARNING   a load generator process was near 100% of a core: the numbers may show "
            "the generator's limit, not the relay's. Add --processes."
        )
    return lines


# -- command line ----------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m relay.tools.loadtest",
        description="Hold N concurrent SSE streams against the relay and measure them.",
    )
    a = p.add_argument
    a("--url", required=True, help="relay base URL (upstream mode: the API base, .../v1)")
    a("--streams", type=int, default=10, help="concurrent streams to hold")
    a("--duration", type=float, default=10.0, help="seconds to keep starting streams")
    a("--ramp", type=float, default=1.0, help="seconds over which the streams start")
    a("--mode", choices=MODES, default="oneshot", help="what one stream is")
    a("--processes", type=int, default=1, help="worker processes sharing the streams")
    a("--json", metavar="PATH", help="write the result as JSON here ('-': stdout)")
    a("--expect-tokens", type=int, help="check sampled text against fakeupstream's answer")
    a("--sample", type=float, default=0.1, help="fraction of streams whose text is checked")
    a("--timeout", type=float, default=60.0, help="seconds one stream may last in all")
    a("--idle-timeout", type=float, default=30.0, help="seconds a stream may stay silent")
    a("--question", default="你好", help="aiQuestion to send")
    a("--robot-id", default="1", help="robotId to send")
    a("--token", help="bearer token for the relay's --auth-tokens")
    a("--no-keepalive", action="store_true", help="a new connection for every stream")
    a("--keep-sessions", action="store_true", help="session mode: do not DELETE when done")
    a("--allow-host", action="append", default=[], metavar="NAME", help="allow a non-loopback host")
    a("--watch-pid", type=int, action="append", default=[], help="also report this pid's CPU")
    a("--quiet", action="store_true", help="no progress line and no summary")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Exit status: 0 if every stream completed exact, 1 if not, 2 for bad flags, 130 on Ctrl-C."""
    parser = _parser()
    args = parser.parse_args(argv)
    cfg = _config(args)
    _check(parser, cfg)
    try:
        result = run(cfg)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    if not cfg.quiet:
        print(format_summary(result), file=sys.stderr)
    if args.json == "-":
        print(json.dumps(result, indent=2, ensure_ascii=False))
    elif args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2, ensure_ascii=False)
    return 0 if result["ok"] else 1


def _config(args: argparse.Namespace) -> LoadConfig:
    return LoadConfig(
        url=args.url,
        streams=args.streams,
        duration=args.duration,
        ramp=args.ramp,
        mode=args.mode,
        processes=args.processes,
        expect_tokens=args.expect_tokens,
        sample=args.sample,
        timeout=args.timeout,
        idle_timeout=args.idle_timeout,
        question=args.question,
        robot_id=args.robot_id,
        token=args.token,
        keepalive=not args.no_keepalive,
        keep_sessions=args.keep_sessions,
        allow_hosts=tuple(args.allow_host),
        watch_pids=tuple(args.watch_pid),
        quiet=args.quiet,
    )


def _check(parser: argparse.ArgumentParser, cfg: LoadConfig) -> None:
    """Exit with status 2 and one line for a run that cannot be done: bad numbers, a refused
    host, too few descriptors (the soft limit is raised to the hard one first)."""
    if cfg.streams < 1 or cfg.duration <= 0 or cfg.ramp < 0:
        parser.error("--streams and --duration must be positive and --ramp not negative")
    if not 1 <= cfg.processes <= cfg.streams:
        parser.error("--processes must be between 1 and --streams")
    if not 0 <= cfg.sample <= 1 or cfg.timeout <= 0 or cfg.idle_timeout <= 0:
        parser.error("--sample must be in [0, 1], the timeouts positive")
    try:
        resolve_target(cfg)
    except (ValueError, OSError) as e:
        parser.error(str(e))
    limit = raise_fd_limit()
    if cfg.streams // cfg.processes + 64 > limit:
        parser.error(
            f"{cfg.streams // cfg.processes} streams per process need more than {limit} fds"
        )


if __name__ == "__main__":
    # Run the imported module's main, not this __main__ copy: worker processes then
    # unpickle relay.tools.loadtest's functions and classes, the same ones the parent has.
    from relay.tools.loadtest import main as _main

    sys.exit(_main())
