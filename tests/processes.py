"""The relay as a real process (``python server.py``), measured from outside: CPU, RSS, log."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def limited(nofile: int | None) -> list[str]:
    """The command prefix that runs a command with soft and hard RLIMIT_NOFILE at ``nofile``
    (util-linux's prlimit rather than a preexec_fn, which is unsafe with threads)."""
    return ["prlimit", f"--nofile={nofile}:{nofile}"] if nofile is not None else []


def read_until_close(sock: socket.socket, timeout: float) -> bytes:
    """Everything ``sock`` receives until the peer closes it (or ``timeout`` passes)."""
    deadline = time.monotonic() + timeout
    data = b""
    while True:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return data
        if not chunk:
            return data
        data += chunk


class RelayProcess:
    """A relay process on ``port`` whose log (stderr) is the file ``log``."""

    def __init__(self, proc: subprocess.Popen, port: int, log: Path) -> None:
        self.proc = proc
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.log = log

    @classmethod
    def start(
        cls,
        args: list[str],
        log: Path,
        nofile: int | None = None,
        command: Sequence[str] = (sys.executable, "server.py"),
        cwd: Path = ROOT,
        env: Mapping[str, str] | None = None,
    ) -> RelayProcess:
        """``command`` (the checkout's ``server.py``) on a free port with ``args``; ``nofile``
        sets a hard descriptor limit (soft = hard), so exhaustion can be tested with a few
        hundred connections. ``env`` adds to the environment, from which every ``RELAY_``
        variable of the test's own is removed."""
        port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")} | dict(env or {})
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                [*limited(nofile), *command, f"--port={port}", *args],
                cwd=cwd,
                env=env,
                stderr=out,
            )
        return cls(proc, port, log)

    def serving(self) -> bool:
        """Whether /healthz answers 200 now (blocking, 1 s at most); fails the test if the
        process has died."""
        assert self.proc.poll() is None, self.log.read_text()
        try:
            with self.connect() as sock:
                sock.settimeout(1)
                sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
                head = sock.recv(4096)
        except OSError:
            return False
        return head.startswith(b"HTTP/1.1 200 ")

    async def ready(self, timeout: float = 15) -> None:
        deadline = time.monotonic() + timeout
        while not self.serving():
            assert time.monotonic() < deadline, self.log.read_text()
            await asyncio.sleep(0.05)

    def wait_ready(self, timeout: float = 15) -> None:
        """`ready` for tests that run no event loop."""
        deadline = time.monotonic() + timeout
        while not self.serving():
            assert time.monotonic() < deadline, self.log.read_text()
            time.sleep(0.05)

    def connect(self) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.port), timeout=2)

    def exchange(self, request: bytes, timeout: float = 5) -> bytes:
        """Send ``request`` on a new connection; everything until the server closes it."""
        with self.connect() as sock:
            sock.sendall(request)
            return read_until_close(sock, timeout)

    def healthz(self) -> float:
        """Seconds a fresh connection takes to get its /healthz 200 (blocking)."""
        started = time.monotonic()
        assert self.serving(), "/healthz did not answer 200 within 1 s"
        return time.monotonic() - started

    def get(self, path: bytes) -> bytes:
        """The body of ``GET path`` on a connection of its own (blocking)."""
        raw = self.exchange(b"GET %s HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n" % path)
        return raw.partition(b"\r\n\r\n")[2]

    def cpu_seconds(self) -> float:
        """User plus system CPU time the process has used."""
        with open(f"/proc/{self.proc.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def rss_bytes(self) -> int:
        with open(f"/proc/{self.proc.pid}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def stop(self) -> int:
        # SIGINT shuts down at once. SIGTERM would drain first, waiting for answers from the
        # test's fake upstream, which cannot send while this blocks the test's event loop.
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            return self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()
