"""Configuration precedence, validation, and the entry point as a real process."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import tomllib
import urllib.request
from dataclasses import fields
from pathlib import Path

import pytest

from relay.config import FLAGS, SETTINGS, ConfigError, Settings, load_settings
from relay.serve import main
from relay.tools import flagdocs
from tests.processes import free_port

ROOT = Path(__file__).resolve().parent.parent


def write_conf(tmp_path: Path, text: str) -> str:
    path = tmp_path / "relay.conf"
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_precedence_is_flag_then_env_then_file_then_default(tmp_path):
    conf = write_conf(tmp_path, 'port = 1111\nmodel = "from-file"\nheartbeat = 5\n')
    env = {"RELAY_PORT": "2222", "RELAY_MODEL": "from-env"}
    s = load_settings([f"--config={conf}", "--port=3333"], env)
    assert s.port == 3333
    assert s.model == "from-env"
    assert s.heartbeat == 5.0
    assert s.session_ttl == 300.0


def test_env_lists_and_file_robots(tmp_path):
    conf = write_conf(
        tmp_path,
        '[[robots]]\nrobotId = "7"\nrobotName = "Seven"\nmodel = "m7"\n'
        'systemPrompt = "be brief"\ntemperature = 0.1\ntopP = 1\n',
    )
    s = load_settings([], {"RELAY_CONFIG": conf, "RELAY_API_KEYS": "k1, k2"})
    assert s.api_keys == ("k1", "k2")
    robot = s.robot("7")
    assert (robot.name, robot.model, robot.system_prompt, robot.top_p) == (
        "Seven",
        "m7",
        "be brief",
        1.0,
    )
    assert s.robot("1") is None


def test_resume_grace_from_flag_env_or_file(tmp_path):
    assert load_settings([], {}).resume_grace == 10.0
    conf = write_conf(tmp_path, "resume_grace = 4\n")
    assert load_settings([f"--config={conf}"], {}).resume_grace == 4.0
    assert load_settings([f"--config={conf}"], {"RELAY_RESUME_GRACE": "2.5"}).resume_grace == 2.5
    flag = load_settings([f"--config={conf}", "--resume-grace=0"], {"RELAY_RESUME_GRACE": "2"})
    assert flag.resume_grace == 0.0


def test_shipped_conf_file_loads():
    s = load_settings([f"--config={ROOT / 'conf' / 'relay.conf'}"], {})
    assert [r.robot_id for r in s.robots] == ["1", "2"]


@pytest.mark.parametrize(
    ("argv", "env", "message"),
    [
        (["--bogus=1"], {}, "unknown flag --bogus"),
        (["--port=abc"], {}, "bad value for flag --port"),
        (["--port"], {}, "--name=value"),
        (["--key-strategy=sometimes"], {}, "--key-strategy"),
        (["--heartbeat=0"], {}, "--heartbeat must be positive"),
        (["--header-timeout=0"], {}, "--header-timeout must be positive"),
        (["--upstream-keepalive=-1"], {}, "--upstream-keepalive must not be negative"),
        (["--resume-grace=-1"], {}, "--resume-grace must not be negative"),
        (["--resume-grace=soon"], {}, "bad value for flag --resume-grace"),
        (["--upstream=ftp://x"], {}, "--upstream"),
        (["--auth-tokens=nocolon"], {}, "token:userId"),
        (["--config=/nonexistent.conf"], {}, "not found"),
        ([], {"RELAY_NOPE": "1"}, "RELAY_NOPE"),
    ],
)
def test_bad_configuration_is_one_clear_line(argv, env, message):
    with pytest.raises(ConfigError, match=message.replace("-", r"\-")):
        load_settings(argv, env)


def test_a_bad_auth_tokens_entry_is_named_by_its_form_not_echoed():
    with pytest.raises(ConfigError) as refused:
        load_settings(["--auth-tokens=tok-a:alice,tok-secret"], {})
    assert str(refused.value) == "--auth-tokens: entries must be token:userId, separated by commas"


def test_secrets_never_appear_in_the_settings_repr():
    s = load_settings(["--api-keys=sk-very-secret", "--auth-tokens=tok-secret:alice"], {})
    assert "secret" not in repr(s)


def test_server_stops_on_unknown_flag_with_one_line():
    proc = subprocess.run(
        [sys.executable, "server.py", "--bogus=1"],
        check=False,
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["relay: unknown flag --bogus"]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_server_process_streams_the_demo_and_exits_0_on_signal(sig):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
    proc = subprocess.Popen(
        [sys.executable, "server.py", f"--port={port}", "--demo-token-delay=0.05"],
        cwd=ROOT,
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1) as r:
                    assert json.load(r)["status"] == "ok"
                break
            except OSError:
                assert time.monotonic() < deadline, "server did not start"
                time.sleep(0.1)
        req = urllib.request.Request(
            f"http://127.0.0.1:{port}/aianswer/streamAsk",
            data=json.dumps({"robotId": "1", "aiQuestion": "你好"}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=10) as r:
            assert r.readline() == b"retry: 3000\n"
            seen = b""
            while b"id: 3\n" not in seen:
                seen += r.readline()
            proc.send_signal(sig)
            rest = r.read()
        assert b"event: error" in rest and b'"shutdown"' in rest
        assert proc.wait(timeout=10) == 0
    finally:
        proc.kill()
        proc.wait()


def test_default_max_streams_fits_the_descriptor_limit_quietly():
    code = (
        "import resource, logging; logging.basicConfig();"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (100, 20000));"
        "from relay.limits import fit_descriptors;"
        "print(fit_descriptors(0), fit_descriptors(0, upstream=2))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], check=True, cwd=ROOT, capture_output=True, text=True
    )
    assert proc.stdout.split() == ["9968", "6645"]  # (20000 - 64) // 2 and // 3
    assert proc.stderr == ""


def test_descriptor_limit_is_raised_and_max_streams_lowered_to_fit():
    code = (
        "import resource, logging; logging.basicConfig();"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (100, 264));"
        "from relay.limits import fit_descriptors;"
        "print(fit_descriptors(1000), resource.getrlimit(resource.RLIMIT_NOFILE)[0])"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], check=True, cwd=ROOT, capture_output=True, text=True
    )
    assert proc.stdout.split() == ["100", "264"]
    assert (
        "--max-streams=1000 needs 2064 descriptors but the limit is 264; using 100" in proc.stderr
    )


def test_include_usage_from_flag_env_file_and_the_robot_table(tmp_path):
    conf = write_conf(
        tmp_path,
        'include_usage = false\n[[robots]]\nrobotId = "1"\nrobotName = "One"\n'
        'includeUsage = true\n[[robots]]\nrobotId = "2"\nrobotName = "Two"\n',
    )
    s = load_settings([f"--config={conf}"], {})
    assert s.include_usage is False
    assert (s.robot("1").include_usage, s.robot("2").include_usage) == (True, None)
    assert load_settings([f"--config={conf}"], {"RELAY_INCLUDE_USAGE": "true"}).include_usage
    assert not load_settings(["--include-usage=0"], {}).include_usage
    assert load_settings([], {}).include_usage is True


@pytest.mark.parametrize(
    ("argv", "env", "conf", "message"),
    [
        (["--include-usage=no"], {}, "", "bad value for flag --include-usage"),
        ([], {"RELAY_INCLUDE_USAGE": "yes"}, "", "RELAY_INCLUDE_USAGE"),
        ([], {}, 'include_usage = "sometimes"\n', "include_usage"),
        ([], {}, '[[robots]]\nrobotId = "1"\nrobotName = "x"\nincludeUsage = 1\n', "includeUsage"),
    ],
)
def test_bad_include_usage_values_are_one_clear_line(tmp_path, argv, env, conf, message):
    path = write_conf(tmp_path, conf)
    with pytest.raises(ConfigError, match=message):
        load_settings([f"--config={path}", *argv], env)


def test_every_settings_field_but_the_robots_is_a_declared_flag():
    assert {f.name for f in fields(Settings)} - {"robots"} == {s.name for s in SETTINGS}


def _as_text(value: object) -> str:
    """A declared default as a flag or env value."""
    if isinstance(value, bool):
        return str(value).lower()
    return "" if value in (None, (), {}) else str(value)


def _as_toml(value: object) -> str:
    """A declared default as a config file value: lists are arrays, None the empty string."""
    if isinstance(value, tuple | dict):
        return "[]"
    return json.dumps("" if value is None else value)


def test_every_setting_is_a_flag_an_env_var_and_a_file_key(tmp_path):
    """Each declared default, given back through each way in, is what a bare start gets."""
    empty = tmp_path / "empty.conf"
    empty.touch()
    bare = load_settings([f"--config={empty}"], {})
    assert bare == Settings()
    flags = [f"{s.flag}={_as_text(s.default)}" for s in SETTINGS]
    env = {s.env: _as_text(s.default) for s in SETTINGS}
    conf = write_conf(tmp_path, "".join(f"{s.name} = {_as_toml(s.default)}\n" for s in SETTINGS))
    assert load_settings([f"--config={empty}", *flags], {}) == bare
    assert load_settings([], {"RELAY_CONFIG": str(empty), **env}) == bare
    assert load_settings([f"--config={conf}"], {}) == bare


def test_the_config_file_cannot_name_itself(tmp_path):
    conf = write_conf(tmp_path, 'config = "other.conf"\n')
    with pytest.raises(ConfigError, match="unknown config file key 'config'"):
        load_settings([f"--config={conf}"], {})


def test_every_key_of_the_shipped_conf_is_a_setting_even_commented_out():
    text = (ROOT / "conf" / "relay.conf").read_text(encoding="utf-8")
    top = text.split("[[robots]]")[0]
    keys = re.findall(r"^#?\s*([a-z_]+)\s*=", top, re.MULTILINE)
    assert keys and set(keys) <= {s.name for s in SETTINGS}, set(keys)
    assert set(tomllib.loads(top)) <= {s.name for s in SETTINGS}


@pytest.mark.parametrize("argv", [["--help"], ["-h"], ["--port=bogus", "--help"]])
def test_help_prints_every_flag_with_its_env_name_default_and_meaning(argv, capsys):
    assert main(argv) == 0
    out = capsys.readouterr().out
    for s in FLAGS:
        assert f"  {s.flag}  ({s.env}; default: {s.default_text})" in out
        assert " ".join(s.help.split()[:4]) in out
    assert "flag > env > file > default" in out


@pytest.mark.parametrize("doc", flagdocs.DOCS, ids=lambda doc: doc.name)
def test_the_docs_flags_table_is_the_generated_one(doc):
    text = doc.read_text(encoding="utf-8")
    assert flagdocs.rewritten(text) == text, (
        f"the flags table of {doc.relative_to(ROOT)} differs from relay/config.py:"
        f" run {flagdocs.COMMAND}"
    )


def test_flagdocs_check_finds_drift_and_the_rewrite_ends_it(tmp_path, capsys):
    doc = tmp_path / "README.md"
    shutil.copy(ROOT / "README.md", doc)
    assert flagdocs.main(["--check"], [doc]) == 0
    doc.write_text(doc.read_text().replace("| 8888 |", "| 8080 |"))
    assert flagdocs.main(["--check"], [doc]) == 1
    assert flagdocs.COMMAND in capsys.readouterr().out
    assert flagdocs.main([], [doc]) == 0
    assert doc.read_text() == (ROOT / "README.md").read_text()
