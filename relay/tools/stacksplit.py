"""Split a py-spy profile of the relay into the parts of a stream (docs/benchmarks.md, j).

    python -m relay --port=8090 --upstream=http://127.0.0.1:8091/v1 --max-streams=20000 &
    python -m relay.tools.fakeupstream --port=8091 --tokens=1 --interval-ms=0 &
    py-spy record --format raw -r 250 --nonblocking -d 18 -o stacks.txt -p <relay pid> &
    python -m relay.tools.loadtest --url=http://127.0.0.1:8090 --streams=200 --duration=15 \\
        --ramp=1 --expect-tokens=1 --quiet
    python -m relay.tools.stacksplit stacks.txt --ms-per-stream=1.09

(``--ms-per-stream``: the relay's CPU per stream over the same run, for example the bench's
"CPU per new stream" of scenario f.) Each sample goes to the part of a stream that the loop
callback it is in belongs to (the frame under asyncio's ``Runner.run``), then by the frames
inside that callback. A stack with no Python frame is the loop's own work in C. py-spy's
``--nonblocking`` stacks may be cut short; they are placed by the frames they have.
"""

from __future__ import annotations

import argparse
from collections import Counter
from collections.abc import Iterable, Sequence

LOOP = "the event loop in C (uvloop: epoll, accept, socket calls, timers)"
REQUEST = "request read and parse (relay.http1server, Tornado's header parser)"
ROUTING = "routing and handler set-up (Tornado)"
ACCOUNTING = "accept and connection accounting (relay.connections)"
QUESTION = "question parse and validation"
UPSTREAM_REQUEST = "upstream request (payload, fetch, request head, connection, send)"
RESPONSE_OUT = "response head and events out"
RESPONSE_END = "response end (finish, access line)"
ADMISSION = "admission and session"
HANDLER = "handler: Tornado's own (prepare, finish, flush)"
UPSTREAM_RESPONSE = "upstream response: framing, SSE, chunk rules, session append"
UPSTREAM_END = "upstream response end (pool, HTTPResponse)"
OTHER = "other callbacks"


# The frames from the interpreter's start down to the loop's run (`relay.serve`, uvloop, asyncio).
_MAIN = frozenset({"_run_module_as_main", "_run_code", "<module>", "main", "run", "_run_loop"})


def part(frames: Sequence[str]) -> str:
    """The part of a stream one sample's frames (outermost first) belong to."""
    runner = next((i for i, f in enumerate(frames) if f.startswith("Runner.run ")), -1)
    inner = frames[runner + 1 :]
    if all(f.split(" (", 1)[0] in _MAIN for f in inner):
        return LOOP  # nothing below the loop's run: its own C code
    top, text = inner[0], ";".join(inner)
    if "RequestHandler._execute" in text or "Handler." in top or "start_answer" in text:
        return _handler_part(text)  # also run inline from the connection's read
    if "relay/connections.py" in top:
        return ACCOUNTING
    if "ServerConnection." in top or "relay/http1server.py" in top:
        if "find_handler" in text or "RequestHandler.__init__" in text or "routing.py" in text:
            return ROUTING
        return REQUEST
    if "_ResponseReader.data_received" in top or "_ResponseReader.connection_lost" in top:
        if "relay/eventstream.py" in text or "relay/writer.py" in text:
            return RESPONSE_OUT
        if any(k in text for k in ("ConnectionPool", "._finish ", "._end ", ".response ")):
            return UPSTREAM_END
        return UPSTREAM_RESPONSE
    if "UpstreamCall" in top or "httpclient.py" in top:
        return UPSTREAM_REQUEST
    if "_handle_events" in top and "relay/connections.py" in text:
        return ACCOUNTING
    # A stack cut short above its callback: placed by the innermost frame that says where.
    for frame in reversed(inner):
        for needle, name in _CUT:
            if needle in frame:
                return name
    return OTHER


_CUT = (
    ("write_headers", RESPONSE_OUT),
    ("response_head", RESPONSE_OUT),
    ("format_datetime", RESPONSE_OUT),
    ("relay/eventstream.py", RESPONSE_OUT),
    ("ServerConnection.finish", RESPONSE_END),
    ("relay/http1server.py", REQUEST),
    ("HTTPHeaders.parse", REQUEST),
    ("relay/memory_store.py", ADMISSION),
    ("relay/sessions.py", ADMISSION),
    ("relay/admission.py", ADMISSION),
    ("relay/ask.py", QUESTION),
    ("relay/upstream.py", UPSTREAM_REQUEST),
    ("_ResponseReader", UPSTREAM_END),
    ("relay/pool.py", UPSTREAM_END),
    ("routing.py", ROUTING),
    ("logging/", RESPONSE_END),
)


def _handler_part(text: str) -> str:
    if "relay/ask.py" in text or "read_ask" in text:
        return QUESTION
    if "Upstream.start" in text or "relay/httpclient.py" in text or "UpstreamCall" in text:
        return UPSTREAM_REQUEST
    if "relay/eventstream.py" in text or "relay/writer.py" in text:
        return RESPONSE_END if "finish" in text else RESPONSE_OUT
    if any(k in text for k in ("relay/sessions.py", "memory_store", "admission", "start_answer")):
        return ADMISSION
    return RESPONSE_END if "log_request" in text or "logging/" in text else HANDLER


def split(lines: Iterable[str]) -> Counter[str]:
    """Samples per part, from py-spy's ``--format raw`` lines (``process;thread;frame;...
    count``)."""
    parts: Counter[str] = Counter()
    for line in lines:
        stack, _, count = line.rstrip().rpartition(" ")
        if count.isdigit():
            frames = [f for f in stack.split(";") if f]  # none: the loop's C code
            while frames and frames[0].startswith(("process ", "thread ")):  # --threads etc.
                del frames[0]
            parts[part(frames)] += int(count)
    return parts


def table(parts: Counter[str], ms_per_stream: float) -> str:
    """A Markdown table: each part's share, and its µs per stream."""
    total = sum(parts.values()) or 1
    rows = ["| part of one stream | µs | share |", "|---|---|---|"]
    for name, samples in parts.most_common():
        share = samples / total
        rows.append(f"| {name} | {ms_per_stream * share * 1000:.0f} | {share:.0%} |")
    return "\n".join(rows)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("stacks", help="py-spy record --format raw output")
    parser.add_argument("--ms-per-stream", type=float, default=1.0, help="relay CPU per stream")
    args = parser.parse_args(argv)
    with open(args.stacks, encoding="utf-8") as f:
        print(table(split(f), args.ms_per_stream))


if __name__ == "__main__":
    main()
