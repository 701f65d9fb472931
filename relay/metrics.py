"""Prometheus instruments, one registry per application (tests run many apps).

The per-event counts (events and bytes relayed) are plain integers that a
collector reads at scrape time: a prometheus-client Counter takes a lock on
every ``inc``, which showed up at several percent of the relay's CPU.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

_TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_DURATION_BUCKETS = (0.1, 0.5, 1, 5, 10, 30, 60, 120, 300, 600)


class Metrics:
    """The relay's instruments. Gauges read live counts through callbacks."""

    def __init__(self) -> None:
        self.events = 0  # events written to clients
        self.bytes_out = 0  # event-stream bytes written to clients
        self.evicted: Callable[[], float] = lambda: 0
        self.registry = CollectorRegistry()
        r = self.registry
        r.register(_HotCounters(self))
        self.active_streams = Gauge("relay_active_streams", "Open client streams", registry=r)
        self.active_sessions = Gauge("relay_active_sessions", "Sessions in the store", registry=r)
        self.cooling_keys = Gauge("relay_cooling_keys", "Upstream keys cooling down", registry=r)
        self.slots = Gauge(
            "relay_slots_in_use",
            "Of --max-streams: client streams plus upstream calls with no stream",
            registry=r,
        )
        self.answers = Gauge("relay_running_answers", "Upstream calls running", registry=r)
        self.limits_local = Gauge(
            "relay_limits_local",
            "1 while --rate-limit and the answer caps count in this process only "
            "(a Redis store that does not answer), else 0",
            registry=r,
        )
        self.kept_bytes = Gauge(
            "relay_kept_bytes", "Event bytes kept by all sessions in memory", registry=r
        )
        self.refused = Counter(
            "relay_refused", "Requests refused by admission, by code", ["code"], registry=r
        )
        self.not_attached = Counter(
            "relay_sessions_not_attached",
            "Answers cancelled because no client attached within --attach-grace",
            registry=r,
        )
        self.streams = Counter(
            "relay_streams_ended", "Client streams by how they ended", ["reason"], registry=r
        )
        self.upstream_responses = Counter(
            "relay_upstream_responses", "Upstream answers by HTTP status", ["status"], registry=r
        )
        self.upstream_errors = Counter(
            "relay_upstream_errors", "Upstream failures by code", ["code"], registry=r
        )
        self.key_retries = Counter(
            "relay_key_retries", "Upstream calls retried with another key", registry=r
        )
        self.open_connections = Gauge(
            "relay_open_connections", "Open client connections", registry=r
        )
        self.connection_budget = Gauge(
            "relay_connection_budget", "Client connections allowed before shedding", registry=r
        )
        self.connections_shed = Counter(
            "relay_connections_shed",
            "Connections closed to make room for a new one, by what they were doing",
            ["state"],
            registry=r,
        )
        self.connections_refused = Counter(
            "relay_connections_refused",
            "New connections answered 503 and closed: every open one was busy",
            registry=r,
        )
        self.accept_pauses = Counter(
            "relay_accept_pauses",
            "Pauses in accepting after accept() failed, by error (EMFILE: out of descriptors)",
            ["error"],
            registry=r,
        )
        self.connection_timeouts = Counter(
            "relay_connection_timeouts",
            "Connections closed by --header-timeout, --body-timeout or --idle-timeout",
            ["phase"],
            registry=r,
        )
        # Users are the --auth-tokens users or "anonymous", robots those of the conf:
        # both bounded by the configuration, never by what clients send.
        self.prompt_tokens = Counter(
            "relay_prompt_tokens",
            "Prompt tokens of finished answers, as the upstream reported them",
            ["robot", "user"],
            registry=r,
        )
        self.completion_tokens = Counter(
            "relay_completion_tokens",
            "Completion tokens of finished answers, as the upstream reported them",
            ["robot", "user"],
            registry=r,
        )
        self.ttft = Histogram(
            "relay_time_to_first_token_seconds",
            "From session start to its first relayed event",
            buckets=_TTFT_BUCKETS,
            registry=r,
        )
        self.duration = Histogram(
            "relay_stream_duration_seconds",
            "Client stream duration",
            buckets=_DURATION_BUCKETS,
            registry=r,
        )

    def bind(
        self,
        streams: Callable[[], float],
        sessions: Callable[[], float],
        cooling: Callable[[], float],
        slots: Callable[[], float],
        answers: Callable[[], float],
        kept_bytes: Callable[[], float],
        evicted: Callable[[], float],
    ) -> None:
        self.active_streams.set_function(streams)
        self.active_sessions.set_function(sessions)
        self.cooling_keys.set_function(cooling)
        self.slots.set_function(slots)
        self.answers.set_function(answers)
        self.kept_bytes.set_function(kept_bytes)
        self.evicted = evicted

    def bind_connections(self, open_connections: Callable[[], float], budget: int) -> None:
        self.open_connections.set_function(open_connections)
        self.connection_budget.set(budget)

    def stream_ended(self, reason: str, duration: float) -> None:
        self.streams.labels(reason).inc()
        self.duration.observe(duration)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _HotCounters(Collector):
    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[CounterMetricFamily]:
        m = self.metrics
        yield CounterMetricFamily("relay_events_relayed", "Events written to clients", m.events)
        yield CounterMetricFamily("relay_bytes_out", "Event bytes written to clients", m.bytes_out)
        yield CounterMetricFamily(
            "relay_sessions_evicted",
            "Finished sessions dropped to stay under --max-kept-mib",
            m.evicted(),
        )
