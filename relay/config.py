"""Configuration: flags, ``RELAY_*`` environment variables and ``conf/relay.conf``.

Precedence is flag > environment > file > default. Flags use tornado.options'
``--name=value`` form and its type parsing, so ``--api-keys=a,b`` and
``RELAY_API_KEYS=a,b`` give the same list. The config file is TOML (read with
the standard library's ``tomllib``) rather than tornado's executable Python
config files: it holds the robots table, and a config file should never run code.

Anything wrong (an unknown flag, file key or ``RELAY_`` variable, a value of the
wrong type or out of range) raises `ConfigError` with a one-line message; the
entry point prints it and exits with status 2.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from tornado.options import Error as OptionsError
from tornado.options import OptionParser

from relay.forwarded import parse_networks
from relay.resources import default_config
from relay.storeurl import USAGE as STORE_USAGE
from relay.storeurl import parse_store_url

ENV_PREFIX = "RELAY_"
# tornado.options reads any word but false/0/f as true: "no" would turn a flag on.
_BOOL_FLAGS = frozenset({"include_usage"})
_BOOL_WORDS = frozenset({"true", "false", "1", "0", "t", "f"})


class ConfigError(Exception):
    """A configuration problem, with a message fit for one line on stderr."""


@dataclass(frozen=True, slots=True)
class Robot:
    """One chat persona from the ``[[robots]]`` table of the config file."""

    robot_id: str
    name: str
    model: str | None = None
    system_prompt: str = ""
    temperature: float | None = None
    top_p: float | None = None
    include_usage: bool | None = None  # None: --include-usage decides


DEFAULT_ROBOTS = (Robot("1", "Assistant", system_prompt="You are a helpful assistant."),)


@dataclass(frozen=True, slots=True)
class Settings:
    """Every setting of the relay, resolved and validated. See the README's flags table."""

    host: str = "127.0.0.1"
    port: int = 8888
    upstream: str | None = None
    api_keys: tuple[str, ...] = ()
    key_strategy: str = "random"
    model: str = "gpt-4o-mini"
    session_ttl: float = 300.0
    prune_interval: float = 300.0
    heartbeat: float = 15.0
    pace_ms: int = 0
    upstream_connect_timeout: float = 30.0
    upstream_idle_timeout: float = 60.0
    upstream_timeout: float = 600.0
    upstream_keepalive: float = 15.0
    max_streams: int = 0  # 0: as many as the descriptor limit holds, at most 10,000
    max_answers_per_user: int = 8
    max_answers_per_address: int = 0
    attach_grace: float = 30.0
    resume_grace: float = 10.0
    max_kept_mib: int = 512
    rate_limit: int = 0
    send_timeout: float = 30.0
    header_timeout: float = 10.0
    body_timeout: float = 30.0
    idle_timeout: float = 60.0
    auth_tokens: Mapping[str, str] = field(default_factory=dict)
    cors_origins: tuple[str, ...] = ()
    trusted_proxies: tuple[str, ...] = ()
    store: str = "memory"
    workers: int = 1
    drain_timeout: float = 5.0
    robots: tuple[Robot, ...] = DEFAULT_ROBOTS
    demo_token_delay: float = 0.02
    include_usage: bool = True

    def robot(self, robot_id: str) -> Robot | None:
        for robot in self.robots:
            if robot.robot_id == robot_id:
                return robot
        return None

    def __repr__(self) -> str:
        # Keys and tokens must never reach a log line, even through a repr.
        return f"Settings(host={self.host!r}, port={self.port}, upstream={self.upstream!r}, ...)"


def _define(parser: OptionParser) -> None:
    d = parser.define
    d(
        "config",
        type=str,
        help="TOML config file (default ./conf/relay.conf when present, else the packaged one)",
    )
    d("host", default="127.0.0.1", type=str, help="address to listen on")
    d("port", default=8888, type=int, help="port to listen on")
    d(
        "upstream",
        type=str,
        help="base URL of an OpenAI-compatible API (default: embedded demo)",
    )
    d("api_keys", type=str, multiple=True, help="comma-separated upstream API keys")
    d("key_strategy", default="random", type=str, help="random or round_robin")
    d("model", default="gpt-4o-mini", type=str, help="model for robots that name none")
    d(
        "session_ttl",
        default=300.0,
        type=float,
        help="seconds a session lives after activity",
    )
    d("prune_interval", default=300.0, type=float, help="seconds between prune runs")
    d(
        "heartbeat",
        default=15.0,
        type=float,
        help="seconds of silence before a ': ping'",
    )
    d("pace_ms", default=0, type=int, help="delay between relayed content events")
    d(
        "upstream_connect_timeout",
        default=30.0,
        type=float,
        help="seconds to connect upstream",
    )
    d(
        "upstream_idle_timeout",
        default=60.0,
        type=float,
        help="seconds of upstream silence",
    )
    d(
        "upstream_timeout",
        default=600.0,
        type=float,
        help="seconds an upstream call may last",
    )
    d(
        "upstream_keepalive",
        default=15.0,
        type=float,
        help="seconds an idle upstream connection is kept for reuse (0: none)",
    )
    d(
        "max_streams",
        default=0,
        type=int,
        help="concurrent client streams plus upstream calls with no stream"
        " (0: as many as the descriptor limit holds, at most 10000)",
    )
    d(
        "max_answers_per_user",
        default=8,
        type=int,
        help="running answers per --auth-tokens user (0: no cap)",
    )
    d(
        "max_answers_per_address",
        default=0,
        type=int,
        help="running answers per anonymous client address (0: no cap)",
    )
    d(
        "attach_grace",
        default=30.0,
        type=float,
        help="seconds a session may run before a reader attaches",
    )
    d(
        "resume_grace",
        default=10.0,
        type=float,
        help="seconds a keyed one-shot answer runs on after its reader left",
    )
    d(
        "max_kept_mib",
        default=512,
        type=int,
        help="MiB of events all sessions keep; past it the oldest finished go",
    )
    d(
        "rate_limit",
        default=0,
        type=int,
        help="new streams per minute per client (0: off)",
    )
    d(
        "send_timeout",
        default=30.0,
        type=float,
        help="seconds a client may leave data undrained",
    )
    d(
        "header_timeout",
        default=10.0,
        type=float,
        help="seconds a client may take to send a request's headers, in all",
    )
    d(
        "body_timeout",
        default=30.0,
        type=float,
        help="seconds a client may take to send a request body, in all",
    )
    d(
        "idle_timeout",
        default=60.0,
        type=float,
        help="seconds a kept-alive connection may wait for its next request",
    )
    d("auth_tokens", type=str, multiple=True, help="token:userId,... (default: open)")
    d("cors_origins", type=str, multiple=True, help="allowed CORS origins")
    d(
        "trusted_proxies",
        type=str,
        multiple=True,
        help="CIDRs of proxies whose X-Forwarded-For / X-Real-IP name the client (default: none)",
    )
    d("store", default="memory", type=str, help=STORE_USAGE)
    d(
        "workers",
        default=1,
        type=int,
        help="processes serving the port (0: one per core)",
    )
    d(
        "drain_timeout",
        default=5.0,
        type=float,
        help="seconds SIGTERM lets open streams and running answers finish (0: none)",
    )
    d("demo_token_delay", default=0.02, type=float, help="seconds between demo tokens")
    d(
        "include_usage",
        default=True,
        type=bool,
        help="ask the upstream for usage (stream_options.include_usage)",
    )


def _apply_strings(parser: OptionParser, triples: Sequence[tuple[str, str, str]]) -> None:
    """Set options from (name, value, where-it-came-from) strings with tornado's type parsing."""
    for name, value, where in triples:
        if name not in parser or name == "help":
            raise ConfigError(f"unknown {where}")
        if name.replace("-", "_") in _BOOL_FLAGS and value.lower() not in _BOOL_WORDS:
            raise ConfigError(f"bad value for {where}: true or false")
        try:
            parser.parse_command_line(["relay", f"--{name}={value}"], final=False)
        except (OptionsError, ValueError):
            raise ConfigError(f"bad value for {where}") from None


def _split_args(argv: Sequence[str]) -> list[tuple[str, str, str]]:
    triples = []
    for arg in argv:
        name, equals, value = arg.lstrip("-").partition("=")
        if not arg.startswith("--") or not equals:
            raise ConfigError(f"flags take the form --name=value, got {arg.split('=')[0]!r}")
        triples.append((name, value, f"flag --{name}"))
    return triples


def _read_file(path: str, explicit: bool) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        if explicit:
            raise ConfigError(f"config file not found: {path}") from None
        return {}
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {path} is not valid TOML: {e}") from None


def _apply_file(parser: OptionParser, values: Mapping[str, Any]) -> None:
    for name, value in values.items():
        if name == "robots":
            continue
        if name not in parser or name in ("help", "config"):
            raise ConfigError(f"unknown config file key {name!r}")
        if isinstance(value, list):
            value = ",".join(str(v) for v in value)
        elif isinstance(value, bool):
            value = "true" if value else "false"
        _apply_strings(parser, [(name, str(value), f"config file key {name!r}")])


def _robots(raw: Any, path: str) -> tuple[Robot, ...]:
    if raw is None:
        return DEFAULT_ROBOTS
    if not isinstance(raw, list) or not raw:
        raise ConfigError(f"{path}: robots must be a non-empty array of tables")
    robots = []
    for entry in raw:
        try:
            robot = Robot(
                robot_id=str(entry["robotId"]),
                name=str(entry["robotName"]),
                model=entry.get("model"),
                system_prompt=str(entry.get("systemPrompt", "")),
                temperature=_opt_float(entry.get("temperature")),
                top_p=_opt_float(entry.get("topP")),
                include_usage=entry.get("includeUsage"),
            )
        except (KeyError, TypeError, ValueError):
            raise ConfigError(f"{path}: each robot needs robotId and robotName") from None
        if robot.include_usage is not None and not isinstance(robot.include_usage, bool):
            raise ConfigError(f"{path}: a robot's includeUsage must be true or false")
        robots.append(robot)
    if len({r.robot_id for r in robots}) != len(robots):
        raise ConfigError(f"{path}: robotId values must be unique")
    return tuple(robots)


def _opt_float(value: Any) -> float | None:
    return None if value is None else float(value)


def _auth_tokens(entries: list[str]) -> dict[str, str]:
    tokens = {}
    for entry in entries:
        token, sep, user = entry.partition(":")
        if not sep or not token or not user:
            raise ConfigError("--auth-tokens takes token:userId pairs separated by commas")
        tokens[token] = user
    return tokens


def _validate(s: Settings) -> None:
    if not 0 <= s.port <= 65535:
        raise ConfigError("--port must be between 0 and 65535")
    if s.key_strategy not in ("random", "round_robin"):
        raise ConfigError("--key-strategy must be random or round_robin")
    if s.upstream is not None and not s.upstream.startswith(("http://", "https://")):
        raise ConfigError("--upstream must be an http:// or https:// URL")
    try:
        parse_networks(s.trusted_proxies)
    except ValueError as e:
        raise ConfigError(f"--trusted-proxies: {e}") from None
    positive = (
        "session_ttl",
        "prune_interval",
        "heartbeat",
        "upstream_connect_timeout",
        "upstream_idle_timeout",
        "upstream_timeout",
        "send_timeout",
        "header_timeout",
        "body_timeout",
        "idle_timeout",
        "attach_grace",
        "max_kept_mib",
    )
    for name in positive:
        if getattr(s, name) <= 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be positive")
    for name in (
        "max_streams",
        "pace_ms",
        "rate_limit",
        "resume_grace",
        "workers",
        "drain_timeout",
        "upstream_keepalive",
        "max_answers_per_user",
        "max_answers_per_address",
    ):
        if getattr(s, name) < 0:
            raise ConfigError(f"--{name.replace('_', '-')} must not be negative")
    try:
        parse_store_url(s.store)
    except ValueError as e:
        raise ConfigError(f"--store: {e}") from None
    if s.workers != 1 and s.store == "memory":
        raise ConfigError("--workers other than 1 needs --store=redis://host:port/db")


def load_settings(argv: Sequence[str] = (), environ: Mapping[str, str] | None = None) -> Settings:
    """Resolve settings from flags (``argv`` without the program name), env and file."""
    environ = os.environ if environ is None else environ
    parser = OptionParser()
    _define(parser)
    flags = _split_args(argv)
    env = [
        (key[len(ENV_PREFIX) :].lower(), value, f"environment variable {key}")
        for key, value in environ.items()
        if key.startswith(ENV_PREFIX)
    ]
    # The config file's name itself follows the same precedence.
    named = {parser_name.replace("-", "_"): v for parser_name, v, _ in env + flags}
    path = named.get("config")
    file = path or default_config()
    data = _read_file(file, explicit=path is not None)
    _apply_file(parser, data)
    _apply_strings(parser, env)
    _apply_strings(parser, flags)
    o = parser.as_dict()
    settings = Settings(
        host=o["host"],
        port=o["port"],
        upstream=o["upstream"].rstrip("/") if o["upstream"] else None,
        api_keys=tuple(k.strip() for k in o["api_keys"] if k.strip()),
        key_strategy=o["key_strategy"],
        model=o["model"],
        session_ttl=o["session_ttl"],
        prune_interval=o["prune_interval"],
        heartbeat=o["heartbeat"],
        pace_ms=o["pace_ms"],
        upstream_connect_timeout=o["upstream_connect_timeout"],
        upstream_idle_timeout=o["upstream_idle_timeout"],
        upstream_timeout=o["upstream_timeout"],
        upstream_keepalive=o["upstream_keepalive"],
        max_streams=o["max_streams"],
        max_answers_per_user=o["max_answers_per_user"],
        max_answers_per_address=o["max_answers_per_address"],
        attach_grace=o["attach_grace"],
        resume_grace=o["resume_grace"],
        max_kept_mib=o["max_kept_mib"],
        rate_limit=o["rate_limit"],
        send_timeout=o["send_timeout"],
        header_timeout=o["header_timeout"],
        body_timeout=o["body_timeout"],
        idle_timeout=o["idle_timeout"],
        auth_tokens=_auth_tokens([t.strip() for t in o["auth_tokens"] if t.strip()]),
        cors_origins=tuple(c.strip() for c in o["cors_origins"] if c.strip()),
        trusted_proxies=tuple(p.strip() for p in o["trusted_proxies"] if p.strip()),
        store=o["store"],
        workers=o["workers"],
        drain_timeout=o["drain_timeout"],
        robots=_robots(data.get("robots"), file),
        demo_token_delay=o["demo_token_delay"],
        include_usage=o["include_usage"],
    )
    _validate(settings)
    return settings
