"""The deployment files (issue 14, point 6), checked on a machine with no container engine.

Dockerfile, .dockerignore, compose.yaml, conf/nginx.compose.conf and
conf/tornado-llm-relay.service are parsed, and every path, port, flag, env name and
command they use is checked against the project: paths exist, ports agree with the
relay's, ``RELAY_*`` names and ``--flags`` load through `relay.config.load_settings`,
commands are console scripts of setup.py. Then what can run on loopback runs: ``nginx
-t`` on the compose nginx conf, and the compose stack itself (redis-server, the relay with
the image's and the service's environment, nginx with the compose conf, the image's
HEALTHCHECK command), with compose's host names replaced by 127.0.0.1.
"""

from __future__ import annotations

import ast
import dataclasses
import fnmatch
import ipaddress
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

from relay import demo
from relay.config import ConfigError, Settings, load_settings
from relay.sse import SSEParser
from tests.processes import ROOT, RelayProcess, free_port
from tests.redis_servers import RedisServer

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
QUESTION = "你好"


# -- parsers ---------------------------------------------------------------------------


@dataclasses.dataclass
class Instruction:
    stage: int  # 0 for the first FROM's stage
    keyword: str
    flags: dict[str, str]
    args: str


def dockerfile() -> list[Instruction]:
    """The Dockerfile's instructions: continuation lines joined, comments dropped, and the
    leading ``--name=value`` flags of each split off."""
    logical, pending = [], ""
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        if line.lstrip().startswith("#"):
            continue  # comments, also inside a continued instruction, as Docker reads them
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        if (pending + line).strip():
            logical.append((pending + line).strip())
        pending = ""
    assert not pending, "the Dockerfile ends in a continuation"
    out, stage = [], -1
    for text in logical:
        keyword, _, rest = text.partition(" ")
        flags = {}
        while rest.lstrip().startswith("--"):
            flag, _, rest = rest.lstrip().partition(" ")
            name, _, value = flag[2:].partition("=")
            flags[name] = value
        if keyword.upper() == "FROM":
            stage += 1
        out.append(Instruction(stage, keyword.upper(), flags, rest.strip()))
    return out


def only(instructions: list[Instruction], keyword: str, stage: int | None = None) -> Instruction:
    found = [i for i in instructions if i.keyword == keyword and stage in (None, i.stage)]
    assert len(found) == 1, (keyword, found)
    return found[0]


def image_env(instructions: list[Instruction]) -> dict[str, str]:
    """The ENV of the final stage (``NAME=value`` pairs, shell-quoted)."""
    final = instructions[-1].stage
    env = {}
    for i in instructions:
        if i.keyword == "ENV" and i.stage == final:
            for pair in shlex.split(i.args):
                name, _, value = pair.partition("=")
                env[name] = value
    return env


@dataclasses.dataclass
class Directive:
    name: str
    args: list[str]
    block: list[Directive] | None = None

    def find(self, name: str) -> Iterator[Directive]:
        return (d for d in self.block or [] if d.name == name)


def nginx_conf(text: str) -> Directive:
    """An nginx configuration as a tree of directives (enough of the grammar for ours)."""
    tokens = re.findall(r'"[^"]*"|\'[^\']*\'|[{};]|[^\s{};"\']+', re.sub(r"#[^\n]*", "", text))
    root = Directive("", [], [])
    stack, words = [root], []
    for token in tokens:
        if token == ";":
            stack[-1].block.append(Directive(words[0], words[1:]))
            words = []
        elif token == "{":
            block = Directive(words[0], words[1:], [])
            stack[-1].block.append(block)
            stack.append(block)
            words = []
        elif token == "}":
            assert not words, words
            stack.pop()
        else:
            words.append(token.strip("\"'"))
    assert len(stack) == 1 and not words, "unbalanced nginx configuration"
    return root


def unit_file(path: Path) -> dict[str, list[tuple[str, str]]]:
    """A systemd unit: section -> (key, value) in order (keys may repeat)."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current = None
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), [])
        else:
            key, _, value = line.partition("=")
            assert current is not None, line
            current.append((key.strip(), value.strip()))
    return sections


def console_scripts() -> set[str]:
    """The console commands setup.py declares."""
    for node in ast.walk(ast.parse((ROOT / "setup.py").read_text())):
        if isinstance(node, ast.keyword) and node.arg == "entry_points":
            entry_points = ast.literal_eval(node.value)
            return {line.split("=")[0].strip() for line in entry_points["console_scripts"]}
    raise AssertionError("setup.py declares no entry_points")


def compose() -> dict:
    return yaml.safe_load((ROOT / "compose.yaml").read_text())


def interpolate(value: str) -> str:
    """Compose's ``${NAME:-default}`` with nothing set: the default."""
    return re.sub(r"\$\{\w+(?::?-([^}]*))?\}", lambda m: m.group(1) or "", str(value))


def service_env(service: dict) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.partition("=")[::2] for item in env)
    return {name: interpolate(value) for name, value in env.items()}


def seconds(duration: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    return sum(float(n) * units[u] for n, u in re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h)", duration))


def settings_of(flags: list[str], env: Mapping[str, str]) -> Settings:
    """What the relay makes of these flags and ``RELAY_*`` variables; an unknown name or a
    bad value fails here."""
    relay_env = {k: v for k, v in env.items() if k.startswith("RELAY_")}
    return load_settings(flags, relay_env)


def mounts(service: dict) -> list[tuple[Path, str]]:
    """The service's bind mounts: (path in the project, path in the container)."""
    out = []
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        assert source.startswith("./"), f"{volume}: only bind mounts of project files"
        out.append((ROOT / source, target))
    return out


# -- the Dockerfile ------------------------------------------------------------------------


def test_dockerfile_builds_the_wheel_in_one_slim_stage_and_installs_only_it_in_another():
    instructions = dockerfile()
    build, final = [i for i in instructions if i.keyword == "FROM"]
    assert re.fullmatch(r"python:3\.1[1-9]-slim AS build", build.args), build.args
    assert re.fullmatch(r"python:3\.1[1-9]-slim", final.args), final.args
    build_runs = " ".join(i.args for i in instructions if i.keyword == "RUN" and i.stage == 0)
    assert "python -m build" in build_runs
    # The final stage takes nothing from the build context: only the build stage's wheels.
    assert not [i for i in instructions if i.stage == 1 and i.keyword in ("COPY", "ADD")]
    (install,) = [i for i in instructions if i.keyword == "RUN" and i.stage == 1]
    assert install.flags["mount"].startswith("type=bind,from=build,")
    assert "--no-index" in install.args and "tornado-llm-relay" in install.args


def test_dockerfile_runs_the_console_command_unprivileged_on_the_relays_port():
    instructions = dockerfile()
    user = only(instructions, "USER", stage=1).args
    uid = user.split(":")[0]
    assert uid.isdigit() and int(uid) != 0, "a numeric, non-root user"
    assert f"--uid {uid}" in " ".join(i.args for i in instructions if i.keyword == "RUN")
    assert only(instructions, "EXPOSE").args == str(Settings().port)
    assert only(instructions, "STOPSIGNAL").args == "SIGTERM"
    (command,) = [json.loads(only(instructions, "CMD").args)]
    assert command[0] in console_scripts() and command == ["tornado-llm-relay"]
    env = image_env(instructions)
    assert env["RELAY_HOST"] == "0.0.0.0"  # reachable from outside the container
    assert settings_of(command[1:], env).host == "0.0.0.0"
    healthcheck = only(instructions, "HEALTHCHECK")
    probe = json.loads(healthcheck.args.removeprefix("CMD").strip())
    assert probe[:2] == ["python", "-c"] and "/healthz" in probe[2] and "urllib" in probe[2]
    # Docker's stop waits 10 s by default: the drain and the shutdown must fit.
    assert Settings().drain_timeout < 10 - 3


def dockerignored(path: str) -> bool:
    """Whether .dockerignore keeps ``path`` (relative, with /) out of the build context, as
    Docker reads it: when the path or a folder above it matches; ``**/`` at any depth."""
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    parts = path.split("/")
    above = ["/".join(parts[:j]) for j in range(1, len(parts) + 1)]
    anywhere = ["/".join(parts[i:j]) for j in range(1, len(parts) + 1) for i in range(j)]
    return any(
        any(fnmatch.fnmatchcase(p, pattern.removeprefix("**/")) for p in anywhere)
        if pattern.startswith("**/")
        else any(fnmatch.fnmatchcase(p, pattern) for p in above)
        for pattern in patterns
    )


def test_everything_the_dockerfile_copies_is_in_the_build_context():
    for copy in (i for i in dockerfile() if i.keyword == "COPY" and "from" not in i.flags):
        *sources, _target = shlex.split(copy.args)
        for source in sources:
            assert (ROOT / source).exists(), source
            assert not dockerignored(source), source
    # What `python -m build` needs is in the context; what must never be is not.
    for needed in ("setup.py", "MANIFEST.in", "README.md", "server.py", "relay", "static", "conf"):
        assert (ROOT / needed).exists() and not dockerignored(needed), needed
    for kept_out in (".git", ".venv", ".env", "prod.env", "dist", "relay/__pycache__"):
        assert dockerignored(kept_out), kept_out


def build_context(into: Path) -> None:
    """Copy the project as ``docker build .`` sends it: less what .dockerignore keeps out."""
    for folder, dirs, files in os.walk(ROOT):
        base = Path(folder).relative_to(ROOT)
        dirs[:] = [d for d in dirs if not dockerignored((base / d).as_posix())]  # not .venv
        for name in files:
            relative = (base / name).as_posix()
            if not dockerignored(relative):
                (into / relative).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(ROOT / relative, into / relative)


@pytest.mark.slow
def test_the_dockerfiles_build_and_install_steps_run_here(tmp_path):
    """Each stage's RUN commands, run in a fresh venv of their own with the image's paths
    (/src, /dist, /wheels) under ``tmp_path``: the build stage on a copy of the build
    context, the final stage from the wheels alone. The final stage's user creation does
    not run here; the installed command then serves from an empty directory."""
    instructions = dockerfile()

    def here(command: str) -> str:
        for path in ("/dist", "/wheels"):
            command = re.sub(rf"(?<![\w.]){path}\b", str(tmp_path) + path, command)
        return command

    def run(command: str, venv: Path, cwd: Path) -> None:
        done = subprocess.run(
            ["sh", "-ec", here(command)],
            cwd=cwd,
            env={**os.environ, "PATH": f"{venv}/bin:{os.environ['PATH']}"},
            capture_output=True,
            text=True,
            check=False,
        )
        assert done.returncode == 0, (command, done.stderr[-2000:])

    build, final = tmp_path / "build-venv", tmp_path / "final-venv"
    for venv in (build, final):
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    src = tmp_path / "src"
    build_context(src)
    assert only(instructions, "WORKDIR", stage=0).args == "/src"
    for step in (i for i in instructions if i.keyword == "RUN" and i.stage == 0):
        run(step.args, build, src)
    (install,) = [i for i in instructions if i.keyword == "RUN" and i.stage == 1]
    pip, *accounts = install.args.split("&&")
    assert all(a.split()[0] in ("groupadd", "useradd") for a in accounts), accounts
    empty = tmp_path / "srv-relay"
    empty.mkdir()
    run(pip, final, empty)
    assert not list(final.glob("lib/python*/site-packages/*.egg-link"))  # a wheel, not a link
    script = final / "bin" / json.loads(only(instructions, "CMD").args)[0]
    env = image_env(instructions) | {"RELAY_HOST": "127.0.0.1"}
    relay = RelayProcess.start(
        [], tmp_path / "relay.log", command=[str(script)], cwd=empty, env=env
    )
    try:
        relay.wait_ready()
        assert healthcheck(relay.port).returncode == 0
        assert get(relay.url + "/readyz")[0] == 200
    finally:
        assert relay.stop() == 0


# -- compose.yaml ------------------------------------------------------------------------------


def test_compose_services_agree_on_paths_ports_names_and_networks():
    spec = compose()
    services = spec["services"]
    assert set(services) == {"relay", "redis", "nginx"}
    relay, redis, nginx = services["relay"], services["redis"], services["nginx"]
    # Every bind mount is a file of the project.
    for service in services.values():
        for source, _ in mounts(service):
            assert source.is_file(), source
    # The relay: this Dockerfile, two workers sharing sessions in the redis service.
    assert relay["build"] == "." and (ROOT / "Dockerfile").is_file()
    env = service_env(relay)
    settings = settings_of([], image_env(dockerfile()) | env)
    assert settings.workers == 2
    store = urlsplit(settings.store)
    assert store.hostname == "redis" and (store.port or 6379) == 6379
    assert "--port" not in redis.get("command", [])  # so Redis listens on 6379
    # Its robots are mounted where --config's default looks: the image's workdir's conf/.
    workdir = only(dockerfile(), "WORKDIR", stage=1).args
    assert [t for _, t in mounts(relay)] == [f"{workdir}/conf/relay.conf"]
    # SIGTERM drains for RELAY_DRAIN_TIMEOUT; compose kills after stop_grace_period.
    assert settings.drain_timeout + 5 <= seconds(relay["stop_grace_period"])
    assert relay["ulimits"]["nofile"] >= 2 * 10_000 + 100
    # Images: official ones, pinned to a major version.
    assert re.fullmatch(r"redis:\d+(-alpine)?", redis["image"]), redis["image"]
    assert re.fullmatch(r"nginx:\d+\.\d+(-alpine)?", nginx["image"]), nginx["image"]
    # nginx: the only published port, its conf from conf/, the relay on the relay's port.
    assert [s for s in services.values() if "ports" in s] == [nginx]
    (published,) = nginx["ports"]
    _, container_port = published.split(":")
    (source, target), *_ = mounts(nginx)
    assert source == ROOT / "conf" / "nginx.compose.conf"
    assert target == "/etc/nginx/conf.d/default.conf"
    conf = nginx_conf(source.read_text())
    (server,) = conf.find("server")
    assert [d.args for d in server.find("listen")] == [[container_port]]
    (upstream,) = conf.find("upstream")
    hosts = [d.args[0].rsplit(":", 1) for d in upstream.find("server")]
    assert hosts == [["relay", str(settings.port)]]
    assert settings.port == int(only(dockerfile(), "EXPOSE").args)
    # Start order: each waits for what it needs to be healthy.
    for service in services.values():
        assert set(service.get("depends_on", {})) <= set(services)
    assert nginx["depends_on"]["relay"]["condition"] == "service_healthy"
    assert only(dockerfile(), "HEALTHCHECK")  # which that condition needs
    assert relay["depends_on"]["redis"]["condition"] == "service_healthy"
    # Networks: nginx and the relay on edge, the relay and Redis on store, nothing else.
    networks = spec["networks"]
    for service in services.values():
        assert set(service["networks"]) <= set(networks)
    assert set(nginx["networks"]) == {"edge"} and set(redis["networks"]) == {"store"}
    assert networks["store"]["internal"] is True
    # The relay trusts forwarded addresses from the edge network, where only nginx calls it.
    (subnet,) = [ipaddress.ip_network(c["subnet"]) for c in networks["edge"]["ipam"]["config"]]
    trusted = [ipaddress.ip_network(c) for c in env["RELAY_TRUSTED_PROXIES"].split(",")]
    assert trusted == [subnet]


def test_compose_and_dockerfile_env_names_are_real_settings():
    names = set(image_env(dockerfile())) | set(service_env(compose()["services"]["relay"]))
    relay_names = {n for n in names if n.startswith("RELAY_")}
    assert relay_names, names
    for name in relay_names:
        # One at a time, so a failure names the variable; values as compose gives them.
        value = {**image_env(dockerfile()), **service_env(compose()["services"]["relay"])}[name]
        env = {name: value}
        if name == "RELAY_WORKERS":
            env["RELAY_STORE"] = "redis://127.0.0.1:6379/0"  # --workers needs it
        settings_of([], env)


@pytest.mark.parametrize(
    ("flags", "env", "message"),
    [
        ([], {"RELAY_NO_SUCH_SETTING": "1"}, "RELAY_NO_SUCH_SETTING"),
        (["--no-such-flag=1"], {}, "--no-such-flag"),
        ([], {"RELAY_DRAIN_TIMEOUT": "soon"}, "RELAY_DRAIN_TIMEOUT"),
    ],
)
def test_the_settings_check_refuses_unknown_names_and_bad_values(flags, env, message):
    with pytest.raises(ConfigError, match=message):
        settings_of(flags, env)


def test_the_compose_nginx_conf_streams_like_the_example_and_forwards_the_client():
    def aianswer(path: Path) -> Directive:
        (server,) = nginx_conf(path.read_text()).find("server")
        (location,) = [d for d in server.find("location") if d.args == ["/aianswer/"]]
        return location

    def pairs(location: Directive) -> set[tuple[str, ...]]:
        return {(d.name, *d.args) for d in location.block or []}

    example = aianswer(ROOT / "conf" / "nginx.conf.example")
    composed = aianswer(ROOT / "conf" / "nginx.compose.conf")
    # Every event-stream setting of the example (unbuffered, uncompressed, long timeouts,
    # HTTP/1.1 keep-alive), and the client's address in both forms.
    assert pairs(example) <= pairs(composed), pairs(example) - pairs(composed)
    assert ("proxy_buffering", "off") in pairs(composed) and ("gzip", "off") in pairs(composed)
    (server,) = nginx_conf((ROOT / "conf" / "nginx.compose.conf").read_text()).find("server")
    for location in server.find("location"):
        if any(d.name == "proxy_pass" for d in location.block or []):
            assert ("proxy_set_header", "X-Forwarded-For", "$proxy_add_x_forwarded_for") in pairs(
                location
            ), location.args
            assert ("proxy_set_header", "X-Real-IP", "$remote_addr") in pairs(location)


# -- on loopback ------------------------------------------------------------------------------


def nginx_on_loopback(tmp: Path, relay_port: int, listen_port: int, serve: bool) -> Path:
    """The compose nginx conf with the relay service at 127.0.0.1:``relay_port``, listening
    on 127.0.0.1:``listen_port``, inside a main nginx.conf whose pid, logs and temporary
    files are all in ``tmp`` (so that it runs as any user); its path."""
    text = (ROOT / "conf" / "nginx.compose.conf").read_text()
    text, n = re.subn(r"\bserver\s+relay:\d+", f"server 127.0.0.1:{relay_port}", text)
    assert n == 1
    text, n = re.subn(r"\blisten\s+\d+\s*;", f"listen 127.0.0.1:{listen_port};", text)
    assert n == 1
    (tmp / "default.conf").write_text(text)
    temp = " ".join(
        f"{kind}_temp_path {tmp}/{kind};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    main = tmp / "nginx.conf"
    main.write_text(
        # One process in the foreground, under the caller's own uid: a test, not a server.
        ("daemon off; master_process off;\n" if serve else "")
        + f"pid {tmp}/nginx.pid;\nerror_log {tmp}/error.log;\nevents {{}}\n"
        + f"http {{\n    access_log {tmp}/access.log;\n    {temp}\n"
        + f"    include {tmp}/default.conf;\n}}\n"
    )
    return main


def test_nginx_accepts_the_compose_conf(tmp_path):
    main = nginx_on_loopback(tmp_path, free_port(), free_port(), serve=False)
    checked = subprocess.run(
        [NGINX, "-t", "-p", str(tmp_path), "-c", str(main), "-e", str(tmp_path / "error.log")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert checked.returncode == 0, checked.stderr
    assert "test is successful" in checked.stderr


def test_ci_installs_nginx():
    # Named among the packages .ci/run installs when missing, however it lists them.
    lines = (ROOT / ".ci" / "run").read_text().splitlines()
    assert any(re.search(r"\bnginx\b", line) for line in lines if not line.lstrip().startswith("#"))


def healthcheck(port: int) -> subprocess.CompletedProcess:
    """The image's HEALTHCHECK command, run here with RELAY_PORT set to ``port``."""
    probe = json.loads(only(dockerfile(), "HEALTHCHECK").args.removeprefix("CMD").strip())
    assert probe[0] == "python"
    return subprocess.run(
        [sys.executable, *probe[1:]],
        env={"RELAY_PORT": str(port)},
        capture_output=True,
        timeout=10,
        check=False,
    )


def test_the_healthcheck_fails_when_nothing_answers():
    assert healthcheck(free_port()).returncode != 0


def get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def wait_for(url: str, within: float = 15) -> None:
    deadline = time.monotonic() + within
    while True:
        try:
            if get(url)[0] == 200:
                return
        except OSError:
            pass
        assert time.monotonic() < deadline, f"{url} did not answer 200"
        time.sleep(0.05)


def answer_through(url: str) -> tuple[str, float, float]:
    """A one-shot answer: its text, and the seconds to its first event and to its end."""
    request = urllib.request.Request(
        url + "/aianswer/streamAsk",
        data=json.dumps({"robotId": "1", "aiQuestion": QUESTION}).encode(),
        headers={"Content-Type": "application/json"},
    )
    began = time.monotonic()
    parser, events, first = SSEParser(), [], None
    with urllib.request.urlopen(request, timeout=30) as r:
        while line := r.readline():
            events += parser.feed(line)
            if first is None and events:
                first = time.monotonic() - began
    return text_of(events), first or 0.0, time.monotonic() - began


def text_of(events: list) -> str:
    return "".join(
        choice.get("delta", {}).get("content") or ""
        for e in events
        if e.event == "message" and e.data != "[DONE]"
        for choice in json.loads(e.data).get("choices", [])
    )


@pytest.mark.slow
def test_the_compose_stack_runs_on_loopback(tmp_path):
    """redis-server, the relay as the compose service runs it (the image's ENV and CMD, the
    service's environment and robots mount) and nginx with the compose conf; compose's host
    names become 127.0.0.1 and its ports free ones."""
    services = compose()["services"]
    redis = RedisServer(tmp_path)
    redis.start()
    procs: list[subprocess.Popen] = []
    relay = None
    try:
        env = image_env(dockerfile()) | service_env(services["relay"])
        env["RELAY_HOST"] = "127.0.0.1"  # loopback only, in a test
        env["RELAY_STORE"] = env["RELAY_STORE"].replace("redis:6379", f"127.0.0.1:{redis.port}")
        # The image's workdir, with the service's mounts in it.
        workdir = tmp_path / "srv"
        workdir_in_image = only(dockerfile(), "WORKDIR", stage=1).args
        for source, target in mounts(services["relay"]):
            inside = workdir / Path(target).relative_to(workdir_in_image)
            inside.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(source, inside)
        (command,) = [json.loads(only(dockerfile(), "CMD").args)]
        script = Path(sys.executable).parent / command[0]
        assert script.is_file(), f"{script}: pip install -e . makes it"
        relay = RelayProcess.start(
            command[1:], tmp_path / "relay.log", command=[str(script)], cwd=workdir, env=env
        )
        relay.wait_ready()
        assert get(relay.url + "/readyz") == (200, b'{"status": "ready"}')
        assert healthcheck(relay.port).returncode == 0
        log = relay.log.read_text()
        assert "started 2 workers" in log and "WARNING" not in log, log

        listen = free_port()
        main = nginx_on_loopback(tmp_path, relay.port, listen, serve=True)
        with open(tmp_path / "nginx.out", "wb") as out:
            procs.append(
                subprocess.Popen(
                    [NGINX, "-p", str(tmp_path), "-c", str(main), "-e", str(tmp_path / "e.log")],
                    stderr=out,
                )
            )
        front = f"http://127.0.0.1:{listen}"
        wait_for(front + "/healthz")
        assert get(front + "/readyz")[0] == 200
        assert get(front + "/metrics")[0] == 404
        # Streamed through nginx: the first event long before the end.
        text, first, total = answer_through(front)
        assert text == demo.answer_for(QUESTION)
        assert first < total / 3, (first, total)
        # Sessions created and read through nginx, on either worker, shared through Redis
        # (both answers run at once: the second read is mostly a replay).
        created = []
        for _ in range(2):
            request = urllib.request.Request(
                front + "/aianswer/sessions",
                data=json.dumps({"robotId": "1", "aiQuestion": QUESTION}).encode(),
                headers={"Content-Type": "application/json"},
            )
            with urllib.request.urlopen(request, timeout=10) as r:
                created.append(json.load(r))
        for session in created:
            status, body = get(front + session["streamUrl"])
            assert status == 200 and text_of(SSEParser().feed(body)) == text
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGQUIT)
            proc.wait(timeout=10)
        if relay is not None:
            assert relay.stop() == 0
        redis.stop()


# -- the systemd unit ------------------------------------------------------------------------

UNIT = ROOT / "conf" / "tornado-llm-relay.service"


def exec_start() -> list[str]:
    (value,) = [v for k, v in unit_file(UNIT)["Service"] if k == "ExecStart"]
    return shlex.split(value)


def test_systemd_unit_runs_the_console_command_unprivileged_with_room_to_drain():
    sections = unit_file(UNIT)
    service = dict(sections["Service"])
    command, *flags = exec_start()
    assert command.startswith("/") and Path(command).name in console_scripts()
    env = {}
    for line in (v for k, v in sections["Service"] if k == "Environment"):
        env.update(pair.partition("=")[::2] for pair in shlex.split(line))
    settings = settings_of(flags, env)
    assert settings.host == "127.0.0.1"  # behind nginx on the same host
    # The port the example nginx conf sends to.
    (upstream,) = nginx_conf((ROOT / "conf" / "nginx.conf.example").read_text()).find("upstream")
    assert {d.args[0].rsplit(":", 1)[1] for d in upstream.find("server")} == {str(settings.port)}
    assert service.get("DynamicUser") == "yes" or service.get("User") not in (None, "root", "0")
    assert service["LimitNOFILE"] == "65536"
    assert service["Restart"] == "on-failure"
    assert service["KillSignal"] == "SIGTERM"
    assert service["KillMode"] == "mixed"  # the parent passes SIGTERM on to its workers
    assert settings.drain_timeout + 5 <= seconds(service["TimeoutStopSec"] + "s")
    assert service["EnvironmentFile"].lstrip("-").startswith("/etc/")
    assert "RELAY_API_KEYS" not in " ".join(flags)
    assert dict(sections["Install"])["WantedBy"] == "multi-user.target"


def test_systemd_analyze_verifies_the_unit(tmp_path):
    # Not a skip: .ci/run installs Debian's systemd where systemd-analyze is missing.
    assert shutil.which("systemd-analyze"), "systemd-analyze is missing (see .ci/run)"
    # With this environment's console command in place of the documented venv path.
    command = exec_start()[0]
    script = Path(sys.executable).parent / Path(command).name
    unit = tmp_path / UNIT.name
    unit.write_text(UNIT.read_text().replace(command, str(script)))
    verified = subprocess.run(
        ["systemd-analyze", "verify", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert verified.returncode == 0, verified.stderr
    assert UNIT.name not in verified.stderr, verified.stderr  # no warning about it either
