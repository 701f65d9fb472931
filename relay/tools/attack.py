"""An attacker for the benchmark's "under attack" scenario: slow bodies and a session flood.

    python -m relay.tools.attack --url=http://127.0.0.1:8888 --slow=2000 \
        --posts-per-s=100 --duration=30

For ``--duration`` seconds it keeps ``--slow`` connections open that each send a
``POST /aianswer/streamAsk`` head announcing 1,000 bytes of body, then one byte
a second (a connection the server closes is opened again), and it sends
``--posts-per-s`` ``POST /aianswer/sessions`` a second over `FLOOD_CONNECTIONS`
kept-alive connections (one request at a time on each), reading each answer and
never attaching to the session. Then it prints what the server did with all
that as one JSON line. It only targets loopback hosts, and stops by itself.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections import Counter
from collections.abc import Sequence
from urllib.parse import urlsplit

from relay.limits import raise_fd_limit
from relay.tools.fakeupstream import is_loopback

SLOW_HEAD = (
    b"POST /aianswer/streamAsk HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    b"Content-Length: 1000\r\n\r\n{"
)
ASK = b'{"robotId": "1", "aiQuestion": "flood"}'
SESSION_POST = (
    b"POST /aianswer/sessions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    b"Content-Length: %d\r\n\r\n%s" % (len(ASK), ASK)
)
FLOOD_CONNECTIONS = 16  # each waits for its answer: enough to keep the rate under load


class Attack:
    def __init__(self, host: str, port: int, duration: float) -> None:
        self.host, self.port = host, port
        self.deadline = time.monotonic() + duration
        self.counts: Counter[str] = Counter()

    async def _connect(self, kind: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
        """A new connection, or None (counted, after a pause) when it cannot be had."""
        try:
            return await asyncio.open_connection(self.host, self.port)
        except OSError:
            self.counts[f"{kind}_connect_failed"] += 1
            await asyncio.sleep(0.5)
            return None

    async def slow(self) -> None:
        """One slow-body client, reconnecting whenever the server closes it."""
        while time.monotonic() < self.deadline:
            if (opened := await self._connect("slow")) is None:
                continue
            reader, writer = opened
            self.counts["slow_opened"] += 1
            try:
                writer.write(SLOW_HEAD)
                while time.monotonic() < self.deadline:
                    await writer.drain()
                    try:
                        if await asyncio.wait_for(reader.read(4096), 1.0) == b"":
                            break  # the server closed it
                    except TimeoutError:
                        writer.write(b" ")
            except OSError:
                pass
            else:
                if time.monotonic() < self.deadline:
                    self.counts["slow_closed_by_server"] += 1
            writer.close()

    async def flood(self, per_s: float) -> None:
        """Session POSTs at ``per_s`` a second over one kept-alive connection."""
        if not per_s:
            return
        interval = 1 / per_s
        next_at = time.monotonic()  # the last slot used; the next is one interval on
        # The clock too: while connecting fails, next_at stands still.
        while next_at + interval < self.deadline and time.monotonic() < self.deadline:
            if (opened := await self._connect("flood")) is None:
                continue
            reader, writer = opened
            try:
                while (next_at := next_at + interval) < self.deadline:
                    await asyncio.sleep(max(0.0, next_at - time.monotonic()))
                    writer.write(SESSION_POST)
                    head = await reader.readuntil(b"\r\n\r\n")
                    status = head.split(b" ", 2)[1].decode()
                    length = 0
                    for line in head.split(b"\r\n"):
                        if line.lower().startswith(b"content-length:"):
                            length = int(line.split(b":", 1)[1])
                    await reader.readexactly(length)
                    self.counts[f"session_post_{status}"] += 1
                    if b"connection: close" in head.lower():
                        break
            except (OSError, asyncio.IncompleteReadError):
                self.counts["flood_connection_lost"] += 1
            writer.close()


async def run(url: str, slow: int, posts_per_s: float, duration: float) -> dict[str, int]:
    parts = urlsplit(url)
    attack = Attack(parts.hostname or "127.0.0.1", parts.port or 80, duration)
    tasks = [attack.slow() for _ in range(slow)]
    tasks += [attack.flood(posts_per_s / FLOOD_CONNECTIONS) for _ in range(FLOOD_CONNECTIONS)]
    await asyncio.gather(*tasks)
    return dict(sorted(attack.counts.items()))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m relay.tools.attack", description=__doc__)
    parser.add_argument("--url", required=True)
    parser.add_argument("--slow", type=int, default=2000, help="slow-body connections held")
    parser.add_argument("--posts-per-s", type=float, default=100, help="session POSTs a second")
    parser.add_argument("--duration", type=float, default=30, help="seconds, then it stops")
    args = parser.parse_args(argv)
    if not is_loopback(urlsplit(args.url).hostname or ""):
        parser.error("only loopback hosts are attacked")
    raise_fd_limit()
    result = asyncio.run(run(args.url, args.slow, args.posts_per_s, args.duration))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
