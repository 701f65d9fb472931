"""Installed the way users install it (issue 14): the built wheel, in a fresh venv, outside
the checkout.

`python -m build` makes the sdist and, from it, the wheel (so the sdist is
complete too); the wheel goes into a new venv in a temporary directory, and its
console command starts from an empty directory, where no ``conf/`` or
``static/`` of the checkout can help it.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
import tomllib
import urllib.request
import zipfile
from pathlib import Path

import pytest

from relay import demo
from relay.sse import SSEParser
from tests.processes import ROOT, RelayProcess

QUESTION = "你好"
STATIC = ROOT / "static"
# The page's files, its vendored libraries included: all of them ship in both packages.
PAGE_FILES = sorted(p.relative_to(STATIC).as_posix() for p in STATIC.rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    subprocess.run(
        [sys.executable, "-m", "build", "--outdir", str(out), str(ROOT)],
        check=True,
        capture_output=True,
    )
    return out


@pytest.fixture(scope="module")
def venv(dist: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    where = tmp_path_factory.mktemp("venv")
    subprocess.run([sys.executable, "-m", "venv", str(where)], check=True)
    (wheel,) = dist.glob("*.whl")
    subprocess.run(
        [where / "bin" / "pip", "install", "--quiet", "--disable-pip-version-check", wheel],
        check=True,
    )
    return where


def test_the_sdist_carries_the_tests_docs_page_and_conf(dist: Path) -> None:
    (sdist,) = dist.glob("*.tar.gz")
    with tarfile.open(sdist) as tar:
        names = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    recordings = ROOT / "tests" / "recordings"
    wanted = {f"tests/recordings/{p.name}" for p in recordings.iterdir()}
    wanted |= {"server.py", "pytest.ini", "ruff.toml", "docs/api.md", "conf/relay.conf"}
    wanted |= {"tests/conftest.py", "tests/fakeupstream.py", "tests/node/package-lock.json"}
    wanted |= {f"static/{name}" for name in PAGE_FILES}
    assert wanted <= names, wanted - names
    assert not any("node_modules" in name for name in names)


def test_the_wheel_has_the_page_and_robots_and_no_top_level_server_module(dist: Path) -> None:
    (wheel,) = dist.glob("*.whl")
    with zipfile.ZipFile(wheel) as whl:
        names = set(whl.namelist())
        top_level = next(n for n in names if n.endswith("top_level.txt"))
        assert whl.read(top_level).split() == [b"relay"]
        entry_points = next(n for n in names if n.endswith("entry_points.txt"))
        assert b"tornado-llm-relay = relay.serve:main" in whl.read(entry_points)
    assert not any("/" not in name for name in names), "a top-level module"
    for needed in [*(f"relay/static/{name}" for name in PAGE_FILES), "relay/conf/relay.conf"]:
        assert needed in names, needed


def test_the_console_command_serves_page_robots_and_answers_from_an_empty_directory(
    venv: Path, tmp_path: Path
) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    relay = RelayProcess.start(
        [], tmp_path / "relay.log", command=[str(venv / "bin" / "tornado-llm-relay")], cwd=empty
    )
    try:
        relay.wait_ready()
        page = urllib.request.urlopen(relay.url + "/", timeout=5)
        assert page.status == 200 and b"<html" in page.read().lower()
        for name in ("app.js", "vendor/marked/marked.esm.js"):
            script = urllib.request.urlopen(f"{relay.url}/static/{name}", timeout=5)
            assert script.status == 200
            assert script.read() == (STATIC / name).read_bytes()
        robots = json.load(urllib.request.urlopen(relay.url + "/aianswer/robots", timeout=5))
        conf = tomllib.loads((ROOT / "conf" / "relay.conf").read_text())
        assert robots["robots"] == [
            {"robotId": r["robotId"], "robotName": r["robotName"]} for r in conf["robots"]
        ]
        ask = urllib.request.Request(
            relay.url + "/aianswer/streamAsk",
            data=json.dumps({"robotId": "1", "aiQuestion": QUESTION}).encode(),
            headers={"Content-Type": "application/json"},
        )
        events = SSEParser().feed(urllib.request.urlopen(ask, timeout=30).read())
        text = "".join(
            json.loads(e.data)["choices"][0]["delta"].get("content", "")
            for e in events[:-2]  # then the business node and [DONE]
        )
        assert text == demo.answer_for(QUESTION)
        assert events[-1].data == "[DONE]"
        # Quiet start: one line, where it listens and which upstream it uses; then access lines.
        first, *rest = relay.log.read_text().splitlines()
        assert (
            "relay listening on http://127.0.0.1:" in first
            and "upstream the embedded demo" in first
        )
        assert all(" tornado.access: " in line or " relay.access: " in line for line in rest), rest
    finally:
        relay.stop()


def test_python_dash_m_relay_is_the_same_command(venv: Path, tmp_path: Path) -> None:
    ran = subprocess.run(
        [venv / "bin" / "python", "-m", "relay", "--no-such-flag=1"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=False,
    )
    assert ran.returncode == 2
    assert ran.stderr.startswith("relay: ") and "no-such-flag" in ran.stderr


def test_pip_install_dot_builds_the_same_package_data(tmp_path: Path) -> None:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--target",
            tmp_path,
            ROOT,
        ],
        check=True,
    )
    assert (tmp_path / "relay" / "static" / "index.html").is_file()
    assert (tmp_path / "relay" / "conf" / "relay.conf").is_file()
    assert not (tmp_path / "server.py").exists()


def test_the_vendored_page_libraries_are_the_pinned_versions_with_their_licences() -> None:
    """static/vendor/update.sh copies what package.json pins and the lock file locks."""
    vendor = STATIC / "vendor"
    pins = json.loads((vendor / "package.json").read_text())["dependencies"]
    locked = json.loads((vendor / "package-lock.json").read_text())["packages"]
    assert {name: locked[f"node_modules/{name}"]["version"] for name in pins} == pins
    banners = {
        "marked/marked.esm.js": f"marked v{pins['marked']}",
        "dompurify/purify.min.js": f"DOMPurify {pins['dompurify']}",
        "highlightjs/highlight.min.js": f"Highlight.js v{pins['@highlightjs/cdn-assets']}",
    }
    for path, banner in banners.items():
        assert banner in (vendor / path).read_text()[:400], path
        assert (vendor / path).with_name("LICENSE").stat().st_size > 1000, path
