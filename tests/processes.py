"""The relay as a real process (``python server.py``), measured from outside: CPU, RSS, log."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from tornado.httpclient import AsyncHTTPClient, HTTPClientError

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RelayProcess:
    """``server.py`` on a free port with ``args``; stderr (the log) goes to ``log``.

    ``nofile`` sets a hard descriptor limit for the process (soft = hard), so
    descriptor exhaustion can be tested with a few hundred connections.
    """

    def __init__(self, args: list[str], log: Path, nofile: int | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
        self.log = log
        # util-linux's prlimit rather than a preexec_fn, which is unsafe with threads.
        limit = ["prlimit", f"--nofile={nofile}:{nofile}"] if nofile is not None else []
        self.proc = subprocess.Popen(
            [*limit, sys.executable, "server.py", f"--port={self.port}", *args],
            cwd=ROOT,
            env=env,
            stderr=log.open("w"),
        )

    async def ready(self) -> None:
        client = AsyncHTTPClient(force_instance=True)
        deadline = time.monotonic() + 15
        try:
            while True:
                assert self.proc.poll() is None, self.log.read_text()
                try:
                    await client.fetch(self.url + "/healthz", request_timeout=1)
                    return
                except (OSError, HTTPClientError):
                    assert time.monotonic() < deadline, self.log.read_text()
                    await asyncio.sleep(0.1)
        finally:
            client.close()

    def cpu_seconds(self) -> float:
        """User plus system CPU time the process has used."""
        with open(f"/proc/{self.proc.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def rss_bytes(self) -> int:
        with open(f"/proc/{self.proc.pid}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()
