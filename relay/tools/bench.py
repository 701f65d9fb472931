"""The benchmark: the fake upstream directly, nginx as a pass-through proxy, and the relay,
measured side by side in one run on one machine. Writes a Markdown table.

    python -m relay.tools.bench --runs=3 --out=docs/benchmarks.md      # every scenario
    python -m relay.tools.bench --scenarios=a,b --runs=1                # a quick look

Scenarios (see docs/benchmarks.md): a) 1,000 streams at 50 tokens/s, 200 tokens; b) 100
streams as fast as the upstream sends; c) 8,000 streams held at 1 token/s; d) 3,000 streams at
50 tokens/s (an overload); e) the relay with --workers=2 --store=redis (scenario a's load);
f) short streams (one token each), for the CPU cost of a new stream; g) 100 streams at 50
tokens/s, for the time to first token the relay adds when it is not busy; h) scenario a's
load on the relay alone and again under attack (`relay.tools.attack`: 2,000 slow-body connections
and 100 session POSTs a second that nobody reads); i) the session flow (POST, GET, DELETE) on
--workers=2 with one Redis, and with a three-master Redis Cluster, with the Redis commands and
Redis CPU per relayed event; j) churn: 3,000 streams of 25 tokens at 5 tokens/s, each replaced
by a new one as it ends (about 600 new streams a second), beside nginx, and on --workers=2
with Redis.

Before and after a change, on one machine in one sitting: ``--baseline=DIR`` adds a target
``baseline``, the relay run from the source tree DIR (for example ``git worktree add
/tmp/before <commit>``), to every scenario that has ``relay``. ``--floor`` adds a target
``floor`` and ``floor-codec`` before ``relay``: `relay.tools.floor`, the least any relay in Python
on uvloop costs, and the same with the relay's per-event pipeline (parse, rules, frame) added.

Targets are each run in a fresh process: the fake upstream (always), then for each run, each
target in turn (so slow drift of a shared machine falls on all of them alike): nginx (Debian's,
one worker, ``proxy_buffering off``) or the relay; the load tester runs in its own processes.
CPU per event is what survives a noisy machine: it is read from /proc for the target's
processes only. Everything listens on 127.0.0.1.

Every process comes from the installed package (the relay is ``python -m relay``; in a
checkout, ``pip install -e .``), so the bench runs from any working directory.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

# Children run in the run's scratch directory (cwd), so no ./conf of the caller's reaches the relay.
PY = sys.executable
CLK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


@dataclass(frozen=True)
class Scenario:
    key: str
    title: str
    streams: int
    tokens: int
    interval_ms: int
    duration: float
    ramp: float
    targets: tuple[str, ...] = ("upstream", "nginx", "relay")
    processes: int = 1
    mode: str = ""  # the load tester's --mode; "" = the target's


SCENARIOS = {
    s.key: s
    for s in (
        Scenario("a", "1,000 streams at 50 tokens/s, 200 tokens", 1000, 200, 20, 20, 5),
        Scenario("b", "100 streams, as fast as the upstream sends", 100, 2000, 0, 15, 1),
        Scenario("c", "8,000 streams held at 1 token/s", 8000, 40, 1000, 40, 15, processes=2),
        Scenario("d", "3,000 streams at 50 tokens/s (overload)", 3000, 200, 20, 20, 5, processes=2),
        Scenario(
            "e",
            "--workers=2 --store=redis, 1,000 streams at 50 tokens/s",
            1000,
            200,
            20,
            20,
            5,
            targets=("relay", "relay-workers2"),
        ),
        Scenario(
            "f",
            "new-stream cost: 200 streams of one token each",
            200,
            1,
            0,
            10,
            1,
            targets=("relay",),
        ),
        Scenario(
            "j",
            "churn: 3,000 streams of 25 tokens at 5 tokens/s, each replaced as it ends",
            3000,
            25,
            200,
            30,
            5,
            targets=("nginx", "relay", "relay-workers2"),
            processes=2,
        ),
        Scenario("g", "time to first token added: 100 streams at 50 tokens/s", 100, 200, 20, 15, 3),
        Scenario(
            "h",
            "under attack: 1,000 streams at 50 tokens/s, beside 2,000 slow-body connections "
            "and 100 unread session POSTs a second",
            1000,
            200,
            20,
            20,
            5,
            targets=("relay", "relay-attacked"),
        ),
        Scenario(
            "i",
            "session flow, --workers=2, one Redis or a Redis Cluster of 3 masters: "
            "1,000 streams at 50 tokens/s",
            1000,
            200,
            20,
            20,
            5,
            targets=("relay-redis", "relay-cluster"),
            mode="session",
        ),
    )
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def proc_cpu(pid: int) -> float:
    """CPU seconds (user + system) of a process."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / CLK


def proc_rss(pid: int) -> int:
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * PAGE


def children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []


def wait_http(url: str, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except OSError as e:
            if getattr(e, "code", None):  # an HTTP error status: it is up
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"{url} did not come up") from None
            time.sleep(0.1)


@dataclass
class Target:
    """A process (or process tree) under test, and how to reach it."""

    name: str
    url: str
    mode: str  # the load tester's --mode
    procs: list[subprocess.Popen] = field(default_factory=list)
    redis: RedisSet | None = None  # its store, measured apart

    def pids(self) -> list[int]:
        pids = []
        for p in self.procs:
            pids.append(p.pid)
            pids += children(p.pid)
        return pids

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
        if self.redis is not None:
            self.redis.stop()


@dataclass
class RedisSet:
    """The redis-server processes of a target's store: one, or the masters of a cluster."""

    procs: list[subprocess.Popen]
    ports: list[int]
    url: str

    def commands(self) -> int:
        """Commands all the nodes have run (INFO commandstats), the INFO calls left out."""
        total = 0
        for port in self.ports:
            for line in redis_cli(port, "INFO", "commandstats").splitlines():
                name, _, rest = line.partition(":")
                if name.startswith("cmdstat_") and name != "cmdstat_info":
                    total += int(rest.split(",")[0].removeprefix("calls="))
        return total

    def cpu(self) -> float:
        return sum(proc_cpu(p.pid) for p in self.procs)

    def stop(self) -> None:
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            p.wait(10)


def redis_cli(port: int, *args: str) -> str:
    cli = shutil.which("redis-cli") or "/usr/bin/redis-cli"
    return subprocess.run(
        [cli, "-p", str(port), *args], capture_output=True, text=True, check=True, timeout=60
    ).stdout


def start_redis(workdir: Path, cluster: bool) -> RedisSet:
    """One redis-server, or three masters made a cluster by ``redis-cli --cluster create``
    (each with a bus port of its own); no persistence."""
    procs, ports = [], []
    for i in range(3 if cluster else 1):
        port = free_port()
        args = [shutil.which("redis-server") or "/usr/bin/redis-server", "--port", str(port)]
        args += ["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        if cluster:
            node = workdir / f"redis{i}"
            node.mkdir(exist_ok=True)
            args += ["--dir", str(node), "--cluster-enabled", "yes"]
            args += ["--cluster-port", str(free_port()), "--cluster-node-timeout", "5000"]
        procs.append(subprocess.Popen(args, stdout=subprocess.DEVNULL, cwd=workdir))
        ports.append(port)
    for port in ports:
        deadline = time.monotonic() + 10
        while (
            subprocess.run(
                [shutil.which("redis-cli") or "/usr/bin/redis-cli", "-p", str(port), "PING"],
                capture_output=True,
                check=False,
            ).stdout.strip()
            != b"PONG"
        ):
            if time.monotonic() > deadline:
                raise RuntimeError(f"redis-server on {port} did not start")
            time.sleep(0.05)
    if not cluster:
        return RedisSet(procs, ports, f"redis://127.0.0.1:{ports[0]}/0")
    redis_cli(ports[0], "--cluster", "create", *(f"127.0.0.1:{p}" for p in ports), "--cluster-yes")
    deadline = time.monotonic() + 30
    while any("cluster_state:ok" not in redis_cli(p, "CLUSTER", "INFO") for p in ports):
        if time.monotonic() > deadline:
            raise RuntimeError("the cluster did not become ok")
        time.sleep(0.1)
    return RedisSet(procs, ports, "redis+cluster://" + ",".join(f"127.0.0.1:{p}" for p in ports))


def start_fake(tokens: int, interval_ms: int, workdir: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen(
        [
            PY,
            "-m",
            "relay.tools.fakeupstream",
            f"--port={port}",
            f"--tokens={tokens}",
            f"--interval-ms={interval_ms}",
        ],
        cwd=workdir,
        stderr=(workdir / "fake.log").open("w"),
    )
    url = f"http://127.0.0.1:{port}/v1"
    wait_http(f"http://127.0.0.1:{port}/")
    return proc, url


def start_target(name: str, upstream: str, workdir: Path, baseline: Path | None = None) -> Target:
    """``upstream`` (the fake itself), ``nginx``, or a relay (``relay``, ``relay-workers2``,
    ``relay-attacked``, ``baseline``: the relay from the source tree ``baseline``) in front
    of the fake at ``upstream``; ready to load."""
    if name == "upstream":
        return Target(name, upstream, "upstream")
    if name == "nginx":
        return start_nginx(upstream, workdir)
    if name in ("floor", "floor-codec"):
        return start_floor(name, upstream, workdir)
    return start_relay(name, upstream, workdir, baseline if name == "baseline" else None)


def nginx_conf(upstream: str, port: int, workdir: Path) -> str:
    """One worker passing everything through to ``upstream``, unbuffered, kept alive."""
    up = upstream.removeprefix("http://").removesuffix("/v1")
    return f"""worker_processes 1; daemon off; pid {workdir}/nginx.pid;
error_log {workdir}/nginx-error.log warn; worker_rlimit_nofile 40000;
events {{ worker_connections 30000; }}
http {{ access_log off;
  upstream fake {{ server {up}; keepalive 256; }}
  server {{ listen 127.0.0.1:{port} backlog=4096;
    location / {{ proxy_pass http://fake; proxy_http_version 1.1;
      proxy_set_header Connection ""; proxy_buffering off; proxy_read_timeout 3600s; }} }} }}
"""


def start_nginx(upstream: str, workdir: Path) -> Target:
    port = free_port()
    conf = workdir / "nginx.conf"
    conf.write_text(nginx_conf(upstream, port, workdir))
    proc = subprocess.Popen(
        [shutil.which("nginx") or "/usr/sbin/nginx", "-c", str(conf), "-p", str(workdir)],
        stderr=(workdir / "nginx.log").open("w"),
    )
    url = f"http://127.0.0.1:{port}/v1"
    wait_http(f"http://127.0.0.1:{port}/")
    return Target("nginx", url, "upstream", [proc])


def start_floor(name: str, upstream: str, workdir: Path) -> Target:
    port = free_port()
    args = [PY, "-m", "relay.tools.floor", f"--port={port}", f"--upstream={upstream}"]
    if name == "floor-codec":
        args.append("--codec")
    proc = subprocess.Popen(args, cwd=workdir, stderr=(workdir / f"{name}.log").open("w"))
    url = f"http://127.0.0.1:{port}/v1"
    wait_http(f"http://127.0.0.1:{port}/")
    return Target(name, url, "upstream", [proc])


def start_relay(name: str, upstream: str, workdir: Path, source: Path | None = None) -> Target:
    """The relay (``python -m relay``) with default flags but ``--max-streams``;
    ``relay-workers2`` and ``relay-redis``: two workers sharing a Redis of their own,
    ``relay-cluster``: the same on a three-master Redis Cluster. With ``source``, the
    ``relay`` package comes from that source tree instead of the installed one."""
    port = free_port()
    args = [PY, "-m", "relay", f"--port={port}", f"--upstream={upstream}", "--max-streams=20000"]
    redis = None
    if name in ("relay-workers2", "relay-redis", "relay-cluster"):
        redis = start_redis(workdir, cluster=name == "relay-cluster")
        args += ["--workers=2", f"--store={redis.url}"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
    if source is not None:
        env["PYTHONPATH"] = str(source)
    proc = subprocess.Popen(args, cwd=workdir, env=env, stderr=(workdir / f"{name}.log").open("w"))
    url = f"http://127.0.0.1:{port}"
    wait_http(url + "/healthz")
    # Redis is not the relay: its CPU is kept out of the relay's, and reported apart.
    return Target(name, url, "oneshot", [proc], redis)


class Sampler(threading.Thread):
    """Samples the target's RSS and /healthz latency while the load runs."""

    def __init__(self, target: Target) -> None:
        super().__init__(daemon=True)
        self.target = target
        self.stop_event = threading.Event()
        self.peak_rss = 0
        self.health_ms: list[float] = []

    def run(self) -> None:
        health = self.target.url + "/healthz" if self.target.mode == "oneshot" else None
        while not self.stop_event.wait(1.0):
            try:
                self.peak_rss = max(self.peak_rss, sum(proc_rss(p) for p in self.target.pids()))
            except OSError:
                pass
            if health:
                began = time.monotonic()
                try:
                    with urllib.request.urlopen(health, timeout=10) as r:
                        r.read()
                    self.health_ms.append((time.monotonic() - began) * 1000)
                except OSError:
                    self.health_ms.append(10_000.0)


def run_once(sc: Scenario, target: Target, workdir: Path) -> dict:
    pids = target.pids()
    idle_rss = sum(proc_rss(p) for p in pids) if pids else 0
    cpu_before = sum(proc_cpu(p) for p in pids)
    redis_before = (target.redis.commands(), target.redis.cpu()) if target.redis else None
    sampler = Sampler(target)
    sampler.start()
    attacker = (
        start_attack(target, sc.ramp + sc.duration, workdir)
        if target.name.endswith("attacked")
        else None
    )
    result = run_loadtest(sc, target, workdir / f"{sc.key}-{target.name}.json", workdir)
    sampler.stop_event.set()
    sampler.join()
    attack = json.loads(attacker.communicate(timeout=120)[0] or "{}") if attacker else None
    pids = target.pids()
    cpu = sum(proc_cpu(p) for p in pids) - cpu_before if pids else 0.0
    events = result["events"]["total"] or 1
    redis_stats: dict = {}
    if target.redis is not None and redis_before is not None:
        redis_stats = {
            "redis_commands_per_event": (target.redis.commands() - redis_before[0]) / events,
            "redis_cpu_us_per_event": (target.redis.cpu() - redis_before[1]) / events * 1e6,
        }
    return {
        "streams": sc.streams,
        **redis_stats,
        "events_per_s": result["events"]["per_s"],
        "cpu_us_per_event": cpu / events * 1e6 if pids else None,
        "cpu_ms_per_stream": cpu / max(result["streams"]["started"], 1) * 1e3 if pids else None,
        "cpu_percent": cpu / result["elapsed_s"] * 100 if pids else None,
        "ttft_p50_ms": result["ttft_s"]["p50"] * 1000,
        "ttft_p99_ms": result["ttft_s"]["p99"] * 1000,
        "lag_p50_ms": result["lag_s"]["p50"] * 1000,
        "lag_p99_ms": result["lag_s"]["p99"] * 1000,
        "idle_rss_mb": idle_rss / 1e6,
        "rss_kb_per_stream": (sampler.peak_rss - idle_rss) / sc.streams / 1e3 if pids else None,
        "health_max_ms": max(sampler.health_ms) if sampler.health_ms else None,
        "completed": result["streams"]["completed"],
        "errors": result["errors"]["total"],
        "errors_by_kind": result["errors"]["by_kind"],
        "exact": f"{result['exactness']['exact']}/{result['exactness']['checked']}",
        "loadgen_cpu_percent": result["cpu"]["max_percent_of_core"],
        "attack": attack,
    }


def run_loadtest(sc: Scenario, target: Target, out: Path, workdir: Path) -> dict:
    """`relay.tools.loadtest` with the scenario's load against ``target``; its JSON result."""
    subprocess.run(
        [
            PY,
            "-m",
            "relay.tools.loadtest",
            f"--url={target.url}",
            f"--mode={sc.mode or target.mode}",
            f"--streams={sc.streams}",
            f"--duration={sc.duration}",
            f"--ramp={sc.ramp}",
            f"--expect-tokens={sc.tokens}",
            f"--processes={sc.processes}",
            "--quiet",
            f"--json={out}",
            "--timeout=300",
            "--idle-timeout=60",
        ],
        cwd=workdir,
        check=False,
    )
    return json.loads(out.read_text())


def start_attack(target: Target, duration: float, workdir: Path) -> subprocess.Popen:
    """`relay.tools.attack` against ``target`` for ``duration`` seconds; its JSON on stdout."""
    return subprocess.Popen(
        [PY, "-m", "relay.tools.attack", f"--url={target.url}", f"--duration={duration}"],
        cwd=workdir,
        stdout=subprocess.PIPE,
        text=True,
    )


def median_of(runs: list[dict]) -> dict:
    merged: dict = {}
    for key in runs[0]:
        values = [r[key] for r in runs]
        if all(isinstance(v, (int, float)) for v in values):
            merged[key] = statistics.median(values)
        else:
            merged[key] = values[-1]
    merged["runs"] = len(runs)
    return merged


def bench(
    scenarios: Sequence[str],
    runs: int,
    workdir: Path,
    only: Sequence[str] = (),
    streams: int = 0,
    baseline: Path | None = None,
    floor: bool = False,
) -> dict:
    """Run ``scenarios``; ``streams`` (when not 0) replaces each one's stream count;
    ``baseline``: a source tree whose relay runs beside ``relay`` as target ``baseline``;
    ``floor``: `relay.tools.floor` runs before ``relay`` as ``floor`` and ``floor-codec``."""
    results: dict = {}
    for key in scenarios:
        sc = SCENARIOS[key]
        if streams:
            sc = dataclasses.replace(sc, streams=streams)
        names = [n for n in _targets(sc, baseline, floor) if not only or n in only]
        samples: dict[str, list[dict]] = {name: [] for name in names}
        for i in range(runs):
            for name in names:
                fake, upstream = start_fake(sc.tokens, sc.interval_ms, workdir)
                target = start_target(name, upstream, workdir, baseline)
                try:
                    time.sleep(1)
                    samples[name].append(run_once(sc, target, workdir))
                finally:
                    target.stop()
                    fake.send_signal(signal.SIGTERM)
                    fake.wait(10)
                print(f"{key} {name} run {i + 1}: {json.dumps(samples[name][-1])}", file=sys.stderr)
        for name in names:
            results.setdefault(key, {})[name] = median_of(samples[name])
    return results


def _targets(sc: Scenario, baseline: Path | None, floor: bool = False) -> list[str]:
    """The scenario's targets that can run here, with the floor's before ``relay`` and
    ``baseline`` after it."""
    names = [n for n in sc.targets if n != "nginx" or _has_nginx()]
    if floor and "relay" in names:
        at = names.index("relay")
        names[at:at] = ["floor", "floor-codec"]
    if baseline is not None and "relay" in names:
        names.insert(names.index("relay") + 1, "baseline")
    return names


def _has_nginx() -> bool:
    return bool(shutil.which("nginx")) or Path("/usr/sbin/nginx").exists()


def _fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def markdown(results: dict) -> str:
    lines = []
    for key, by_target in results.items():
        sc = SCENARIOS[key]
        ran = {r.get("streams", sc.streams) for r in by_target.values()}
        note = f" (this run: {', '.join(f'{n:,}' for n in sorted(ran))} streams)"
        lines += [f"### {key}) {sc.title}{note if ran != {sc.streams} else ''}", ""]
        lines.append(
            "| target | events/s | CPU µs/event | CPU % of a core | TTFT p50 / p99 ms "
            "| lag p50 / p99 ms | RSS KB/stream | errors | text exact |"
        )
        lines.append("|---|---|---|---|---|---|---|---|---|")
        for name, r in by_target.items():
            lines.append(
                f"| {name} | {_fmt(r['events_per_s'], 0)} | {_fmt(r['cpu_us_per_event'])} "
                f"| {_fmt(r['cpu_percent'], 0)} | {_fmt(r['ttft_p50_ms'])} / "
                f"{_fmt(r['ttft_p99_ms'])} | {_fmt(r['lag_p50_ms'])} / {_fmt(r['lag_p99_ms'])} "
                f"| {_fmt(r['rss_kb_per_stream'])} | {r['errors']} | {r['exact']} |"
            )
        nginx, relay = by_target.get("nginx"), by_target.get("relay")
        if nginx and relay and nginx["cpu_us_per_event"] and relay["cpu_us_per_event"]:
            ratio = relay["cpu_us_per_event"] / nginx["cpu_us_per_event"]
            lines += ["", f"Relay CPU per event: {ratio:.2f}x nginx's."]
        low = by_target.get("floor")
        if nginx and low and nginx["cpu_us_per_event"] and low["cpu_us_per_event"]:
            ratio = low["cpu_us_per_event"] / nginx["cpu_us_per_event"]
            lines += ["", f"The floor's CPU per event: {ratio:.2f}x nginx's."]
        before = by_target.get("baseline")
        if before and relay and before["cpu_us_per_event"] and relay["cpu_us_per_event"]:
            ratio = relay["cpu_us_per_event"] / before["cpu_us_per_event"]
            lines += ["", f"Relay CPU per event: {ratio:.2f}x the baseline's."]
        if relay and relay.get("health_max_ms") is not None:
            note = (
                f"Relay /healthz under load: at most {relay['health_max_ms']:.0f} ms; "
                f"idle RSS {relay['idle_rss_mb']:.1f} MB."
            )
            if sc.tokens == 1:
                note += f" CPU per new stream, all costs: {relay['cpu_ms_per_stream']:.2f} ms."
            lines += ["", note]
        stored = {n: r for n, r in by_target.items() if "redis_commands_per_event" in r}
        if stored:
            per = "; ".join(
                f"{n}: {r['redis_commands_per_event']:.2f} Redis commands and "
                f"{r['redis_cpu_us_per_event']:.1f} µs of Redis CPU per relayed event"
                for n, r in stored.items()
            )
            lines += ["", f"Redis (all nodes, measured apart from the relay's CPU): {per}."]
        attacked = by_target.get("relay-attacked")
        if attacked and attacked.get("attack") is not None:
            seen = json.dumps(attacked["attack"])
            note = f"Under attack, /healthz at most {attacked['health_max_ms']:.0f} ms"
            lines += ["", f"{note}; what the attacker saw (last run): `{seen}`."]
        lines.append("")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m relay.tools.bench", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--scenarios", default="a,b,c,d,e,f,g,j", help="comma-separated keys")
    parser.add_argument("--runs", type=int, default=3, help="runs per target; medians reported")
    parser.add_argument("--targets", default="", help="only these targets (comma-separated)")
    parser.add_argument("--json", help="write all results as JSON here")
    parser.add_argument("--out", help="write the Markdown tables here")
    parser.add_argument(
        "--streams", type=int, default=0, help="streams per scenario instead of its own (0)"
    )
    parser.add_argument(
        "--baseline",
        type=Path,
        help="a source tree (e.g. a git worktree of an older commit) whose relay runs "
        "beside the installed one as target 'baseline'",
    )
    parser.add_argument(
        "--floor",
        action="store_true",
        help="add targets 'floor' and 'floor-codec' (relay.tools.floor) before 'relay'",
    )
    args = parser.parse_args(argv)
    if args.baseline is not None and not (args.baseline / "relay" / "__main__.py").exists():
        parser.error(f"--baseline: no relay package in {args.baseline}")
    with tempfile.TemporaryDirectory(prefix="relay-bench-") as tmp:
        only = [t for t in args.targets.split(",") if t]
        baseline = args.baseline.resolve() if args.baseline is not None else None
        results = bench(
            args.scenarios.split(","),
            args.runs,
            Path(tmp),
            only=only,
            streams=args.streams,
            baseline=baseline,
            floor=args.floor,
        )
    text = markdown(results)
    print(text)
    if args.out:
        Path(args.out).write_text(text, encoding="utf-8")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
