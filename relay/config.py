"""Configuration: flags, ``RELAY_*`` environment variables and ``conf/relay.conf``.

Each setting is declared once, as a `Settings` field made by `setting()`: the
field gives its name, type and default, the call its meaning, bound and (where
the plain value is not enough) how its string becomes the value. Everything
else is derived from that: the tornado.options definitions, the environment
name ``RELAY_<NAME>``, the config file key (the name itself), the validation,
``--help`` (`help_text`) and the flags table of the README and docs/api.md
(`flags_markdown`, written there by ``python -m relay.tools.flagdocs``).

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
import textwrap
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any, get_args, get_origin, get_type_hints

from tornado.options import Error as OptionsError
from tornado.options import OptionParser

from relay.errors import ConfigError
from relay.forwarded import parse_networks
from relay.resources import default_config
from relay.robots import DEFAULT_ROBOTS, Robot, parse_robots
from relay.setting import ENV_PREFIX, Setting, setting
from relay.storeurl import parse_store_url

# tornado.options reads any word but false/0/f as true: "no" would turn a flag on.
_BOOL_WORDS = frozenset({"true", "false", "1", "0", "t", "f"})


def _base_url(url: str | None) -> str | None:
    return (url or "").rstrip("/") or None


def _networks(items: list[str]) -> tuple[str, ...]:
    parse_networks(items)  # its ValueError names the bad entry
    return tuple(items)


def _auth_tokens(items: list[str]) -> dict[str, str]:
    tokens = {}
    for item in items:
        token, sep, user = item.partition(":")
        if not sep or not token or not user:
            # Never the entry itself: it may be a token.
            raise ValueError("entries must be token:userId, separated by commas")
        tokens[token] = user
    return tokens


@dataclass(frozen=True, slots=True)
class Settings:
    """Every setting of the relay, resolved and validated (`setting` fields are the flags)."""

    host: str = setting("127.0.0.1", "address to listen on")
    port: int = setting(8888, "port to listen on")
    upstream: str | None = setting(
        None,
        "base URL of an OpenAI-compatible API; the relay POSTs `{upstream}/chat/completions`",
        parse=_base_url,
        shown="(none: the embedded demo)",
    )
    api_keys: tuple[str, ...] = setting(
        (),
        "comma-separated upstream keys, sent as `Authorization: Bearer`; prefer the env var",
    )
    key_strategy: str = setting(
        "random",
        "`random` or `round_robin`; a key answered 401/403/429 cools down for 60 s and the next"
        " key is tried, only while nothing has reached the client yet",
        choices=("random", "round_robin"),
    )
    model: str = setting(
        "gpt-4o-mini", "model for robots whose conf names none (a robot's own model wins)"
    )
    session_ttl: float = setting(
        300.0, "seconds a uid session lives after its last activity", bound="positive"
    )
    prune_interval: float = setting(
        300.0,
        "seconds between prune runs (a tornado PeriodicCallback), and between full"
        " garbage-collection passes",
        bound="positive",
    )
    heartbeat: float = setting(
        15.0, "seconds of silence after which a `: ping` comment is sent", bound="positive"
    )
    pace_ms: int = setting(
        0,
        "milliseconds between relayed content events (the typewriter effect; 0: none);"
        " never blocks the loop",
        bound="not negative",
    )
    upstream_connect_timeout: float = setting(30.0, "seconds to connect upstream", bound="positive")
    upstream_idle_timeout: float = setting(
        60.0,
        "seconds of upstream silence (comments do not count) before giving up: 504 before the"
        " first byte, `event: error` code `upstream_timeout` after",
        bound="positive",
    )
    upstream_timeout: float = setting(
        600.0,
        "seconds an upstream call may last in all; a long answer must never be cut at 20 s",
        bound="positive",
    )
    upstream_keepalive: float = setting(
        15.0,
        "seconds an idle connection to the model server is kept for the next call (0: a new"
        ' connection per call, sent with `Connection: close`); docs/api.md, "Upstream connections"',
        bound="not negative",
    )
    max_streams: int = setting(
        0,
        "concurrent client streams (one-shot and session streams alike) plus upstream calls"
        " running with no stream (0: as many as the descriptor limit holds, at most 10000);"
        ' beyond it: 503 `at_capacity` with Retry-After (docs/api.md, "Admission")',
        bound="not negative",
    )
    max_answers_per_user: int = setting(
        8,
        "running answers (upstream calls) per user of `--auth-tokens` (0: no cap); beyond it:"
        " 429 `too_many_answers`, `Retry-After: 1`",
        bound="not negative",
    )
    max_answers_per_address: int = setting(
        0,
        "the same cap for anonymous clients, per client address (0: no cap, the default:"
        " proxies and load testers share addresses)",
        bound="not negative",
    )
    attach_grace: float = setting(
        30.0,
        "seconds a session may run before a reader attaches; then it is cancelled (`not_attached`)",
        bound="positive",
    )
    resume_grace: float = setting(
        10.0,
        "seconds a keyed one-shot answer (`Idempotency-Key`) runs on after its client left with"
        " no other reader; then it is cancelled (`not_attached`) unless a repeat came back"
        " (0: at once)",
        bound="not negative",
    )
    max_kept_mib: int = setting(
        512,
        "MiB of events all sessions of a process keep; past it the oldest finished sessions"
        " are evicted (later GETs are 404)",
        bound="positive",
    )
    rate_limit: int = setting(
        0,
        "new streams (one-shot POSTs and session POSTs; not reconnects) per minute per client"
        " (token, else address; 0: off), counted across every process on a Redis store;"
        " beyond it: 429 with Retry-After",
        bound="not negative",
    )
    send_timeout: float = setting(
        30.0,
        "seconds a client may leave written data undrained before it is disconnected",
        bound="positive",
    )
    header_timeout: float = setting(
        10.0,
        "seconds a client may take to send a request's headers, in all (from the accept, or"
        " from the first byte of a kept-alive connection's next request); then the connection"
        " is closed",
        bound="positive",
    )
    body_timeout: float = setting(
        30.0,
        "seconds a client may take to send a request body, in all; then the connection is closed",
        bound="positive",
    )
    idle_timeout: float = setting(
        60.0,
        "seconds a kept-alive connection may wait before its next request begins; then it is"
        " closed",
        bound="positive",
    )
    auth_tokens: Mapping[str, str] = setting(
        {},
        "`token:userId,...`; when set every /aianswer call needs `Authorization: Bearer <token>`",
        parse=_auth_tokens,
        shown="(none: open)",
    )
    cors_origins: tuple[str, ...] = setting(
        (), "comma-separated allowed origins", shown="(none: same origin only)"
    )
    trusted_proxies: tuple[str, ...] = setting(
        (),
        "comma-separated CIDRs of proxies whose `X-Forwarded-For` (else `X-Real-IP`) names the"
        " client for rate limits, caps and logs (docs/operations.md)",
        parse=_networks,
    )
    store: str = setting(
        "memory",
        "`memory`, or Redis to share sessions (and the rate limit and answer caps) between"
        " processes and hosts: `redis://[:password@]host:port/db`,"
        " `redis+sentinel://[:password@]host:26379[,host:26379]/service/db` or"
        " `redis+cluster://[:password@]host:port[,host:port]` (docs/deploy.md)",
    )
    workers: int = setting(
        1,
        "processes serving one port (0: one per core); more than one needs the Redis store",
        bound="not negative",
    )
    drain_timeout: float = setting(
        5.0,
        "seconds SIGTERM lets open streams and running answers finish before they are told"
        " `shutdown`, everything still served and `/readyz` answering 503 meanwhile (0: no"
        " drain); SIGINT shuts down at once",
        bound="not negative",
    )
    demo_token_delay: float = setting(0.02, "seconds between tokens of the embedded demo upstream")
    include_usage: bool = setting(
        True,
        "ask the model server for usage (`stream_options.include_usage`); a robot's"
        " `includeUsage` in the conf wins when set",
    )
    # The config file's [[robots]] only: not a flag.
    robots: tuple[Robot, ...] = DEFAULT_ROBOTS

    def robot(self, robot_id: str) -> Robot | None:
        for robot in self.robots:
            if robot.robot_id == robot_id:
                return robot
        return None

    def __repr__(self) -> str:
        # Keys and tokens must never reach a log line, even through a repr.
        return f"Settings(host={self.host!r}, port={self.port}, upstream={self.upstream!r}, ...)"


def _declared() -> tuple[Setting, ...]:
    hints = get_type_hints(Settings)
    declared = []
    for f in fields(Settings):
        if "setting" not in f.metadata:
            continue
        hint = hints[f.name]
        # Lists and mappings are comma-separated strings; X | None is parsed as X.
        multiple = get_origin(hint) in (tuple, Mapping)
        args = [a for a in get_args(hint) if a is not type(None)]
        kind = str if multiple else (args[0] if args else hint)
        default = f.default_factory() if callable(f.default_factory) else f.default
        declared.append(f.metadata["setting"](f.name, kind, multiple, default))
    return tuple(declared)


# The settings a config file may set, then every flag: the file cannot name itself.
SETTINGS = _declared()
CONFIG = Setting(
    name="config",
    type=str,
    multiple=False,
    default=None,
    help="the TOML config file: the robots (`[[robots]]`) and any setting above by its name"
    " (`session_ttl = 300`)",
    shown="./conf/relay.conf when present, else the packaged one",
)
FLAGS = (*SETTINGS, CONFIG)
_BY_NAME = {s.name: s for s in FLAGS}


def help_text() -> str:
    """What ``--help`` prints: every flag with its environment name, default and meaning."""
    lines = [
        "usage: tornado-llm-relay [--name=value ...]  (or python -m relay, python server.py)",
        "",
        "Each flag can also be set by its environment variable, or in the config file by its",
        "name with underscores. Precedence: flag > env > file > default.",
    ]
    indent = " " * 6
    for s in FLAGS:
        lines += ["", f"  {s.flag}  ({s.env}; default: {s.default_text})"]
        lines += textwrap.wrap(s.help, 92, initial_indent=indent, subsequent_indent=indent)
    return "\n".join(lines) + "\n"


def flags_markdown() -> str:
    """The flags table of the README and docs/api.md (``python -m relay.tools.flagdocs``)."""
    rows = [f"| `{s.flag}` | `{s.env}` | {s.default_text} | {s.help} |" for s in FLAGS]
    return "\n".join(["| flag | env | default | meaning |", "|---|---|---|---|", *rows]) + "\n"


def _split_args(argv: Sequence[str]) -> list[tuple[Setting, str, str]]:
    entries = []
    for arg in argv:
        name, equals, value = arg.lstrip("-").partition("=")
        if not arg.startswith("--") or not equals:
            raise ConfigError(f"flags take the form --name=value, got {arg.split('=')[0]!r}")
        where = f"flag --{name}"
        entries.append((_lookup(name.replace("-", "_"), where), value, where))
    return entries


def _lookup(name: str, where: str, in_file: bool = False) -> Setting:
    s = _BY_NAME.get(name)
    if s is None or (in_file and s is CONFIG):
        raise ConfigError(f"unknown {where}")
    return s


def _env_entries(environ: Mapping[str, str]) -> list[tuple[Setting, str, str]]:
    entries = []
    for key, value in environ.items():
        if key.startswith(ENV_PREFIX):
            where = f"environment variable {key}"
            entries.append((_lookup(key[len(ENV_PREFIX) :].lower(), where), value, where))
    return entries


def _apply(parser: OptionParser, entries: Iterable[tuple[Setting, str, str]]) -> None:
    """Set options from (setting, value, where-it-came-from) strings with tornado's type parsing."""
    for s, value, where in entries:
        if s.type is bool and value.lower() not in _BOOL_WORDS:
            raise ConfigError(f"bad value for {where}: true or false")
        try:
            parser.parse_command_line(["relay", f"--{s.name}={value}"], final=False)
        except (OptionsError, ValueError):
            raise ConfigError(f"bad value for {where}") from None


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


def _file_entries(values: Mapping[str, Any]) -> list[tuple[Setting, str, str]]:
    entries = []
    for name, value in values.items():
        if name == "robots":
            continue
        if isinstance(value, list):
            text = ",".join(str(v) for v in value)
        elif isinstance(value, bool):
            text = "true" if value else "false"
        else:
            text = str(value)
        where = f"config file key {name!r}"
        entries.append((_lookup(name, where, in_file=True), text, where))
    return entries


def _validate(settings: Settings) -> None:
    for s in SETTINGS:
        value = getattr(settings, s.name)
        if s.choices and value not in s.choices:
            raise ConfigError(f"{s.flag} must be {' or '.join(s.choices)}")
        if s.bound == "positive" and value <= 0:
            raise ConfigError(f"{s.flag} must be positive")
        if s.bound == "not negative" and value < 0:
            raise ConfigError(f"{s.flag} must not be negative")
    # Shapes of single values, and settings that only work together.
    if not 0 <= settings.port <= 65535:
        raise ConfigError("--port must be between 0 and 65535")
    if settings.upstream is not None and not settings.upstream.startswith(("http://", "https://")):
        raise ConfigError("--upstream must be an http:// or https:// URL")
    try:
        parse_store_url(settings.store)
    except ValueError as e:
        raise ConfigError(f"--store: {e}") from None
    if settings.workers != 1 and settings.store == "memory":
        raise ConfigError("--workers other than 1 needs --store=redis://host:port/db")


def load_settings(argv: Sequence[str] = (), environ: Mapping[str, str] | None = None) -> Settings:
    """Resolve settings from flags (``argv`` without the program name), env and file."""
    environ = os.environ if environ is None else environ
    parser = OptionParser()
    for s in FLAGS:
        # A list's default is tornado's empty list; `Setting.value` makes it the field's.
        default = None if s.multiple else s.default
        parser.define(s.name, default=default, type=s.type, multiple=s.multiple, help=s.help)
    flags = _split_args(argv)
    env = _env_entries(environ)
    # The config file's name itself follows the same precedence.
    path = {s.name: value for s, value, _ in env + flags}.get(CONFIG.name)
    file = path or default_config()
    data = _read_file(file, explicit=path is not None)
    for entries in (_file_entries(data), env, flags):
        _apply(parser, entries)
    parsed = parser.as_dict()
    values = {}
    for s in SETTINGS:
        try:
            values[s.name] = s.value(parsed[s.name])
        except ValueError as e:
            raise ConfigError(f"{s.flag}: {e}") from None
    settings = Settings(robots=parse_robots(data.get("robots"), file), **values)
    _validate(settings)
    return settings
