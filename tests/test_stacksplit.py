"""relay.tools.stacksplit: py-spy's raw stacks of the relay, split into the parts of a stream.
The lines are py-spy 0.4's own (``record --format raw``), whole and cut short."""

from __future__ import annotations

from relay.tools import stacksplit

MAIN = (
    "_run_module_as_main (<frozen runpy>:198);_run_code (<frozen runpy>:88);"
    "<module> (relay/__main__.py:5);main (relay/serve.py:68);run (relay/serve.py:77);"
    "_run_loop (relay/serve.py:90);run (uvloop/__init__.py:92)"
)
RUNNER = MAIN + ";Runner.run (asyncio/runners.py:118)"
LINES = [
    " 64",  # no Python frame at all
    RUNNER + " 10",
    RUNNER + ";_ResponseReader.data_received (relay/httpclient.py:326);"
    "_ResponseReader._deliver (relay/httpclient.py:360);UpstreamCall._on_chunk "
    "(relay/upstream.py:297);ChunkRules.apply (relay/chunks.py:286) 7",
    RUNNER + ";_ResponseReader.data_received (relay/httpclient.py:326);"
    "_ResponseReader._finish (relay/httpclient.py:388);ConnectionPool.put (relay/pool.py:80) 3",
    RUNNER + ";RequestHandler._execute (tornado/web.py:2004);StreamAskHandler.post "
    "(relay/streamask.py:46);AskHandler.start_answer (relay/handlers.py:254);"
    "AskHandler.read_ask (relay/handlers.py:238) 2",
    RUNNER + ";ServerConnection.data_received (relay/http1server.py:120);ServerConnection._process"
    " (relay/http1server.py:212);ServerConnection._read_head (relay/http1server.py:230);"
    "_RoutingDelegate.headers_received (tornado/routing.py:265);"
    "RelayApplication.find_handler (relay/app.py:195) 5",
    RUNNER + ";ServerConnection.data_received (relay/http1server.py:120);ServerConnection._process"
    " (relay/http1server.py:212);ServerConnection._read_head (relay/http1server.py:230);"
    "HTTPHeaders.parse (tornado/httputil.py:316) 6",
    "ServerConnection._take (relay/http1server.py:270) 1",
    "AskHandler.start_answer (relay/handlers.py:259);Upstream.start (relay/upstream.py:120);"
    "UpstreamCall.attempt (relay/upstream.py:205) 2",
    "HTTP1Connection.write_headers.<locals>.<genexpr> (tornado/http1connection.py:410) 4",
    'process 4242:"python -m relay";thread (0x7f00);' + RUNNER + ";BaseAsyncIOLoop._handle_events"
    " (tornado/platform/asyncio.py:208);ConnectionServer._accept (relay/connections.py:180) 3",
    "Somewhere.unknown (elsewhere.py:1) 1",
    "not a line of py-spy's",
]


def test_each_sample_goes_to_the_part_of_the_stream_its_callback_belongs_to():
    parts = stacksplit.split(LINES)
    assert parts == {
        stacksplit.LOOP: 74,
        stacksplit.UPSTREAM_RESPONSE: 7,
        stacksplit.UPSTREAM_END: 3,
        stacksplit.QUESTION: 2,
        stacksplit.ROUTING: 5,
        stacksplit.UPSTREAM_REQUEST: 2,
        stacksplit.RESPONSE_OUT: 4,
        stacksplit.ACCOUNTING: 3,
        stacksplit.REQUEST: 7,
        stacksplit.OTHER: 1,
    }


def test_the_table_gives_each_part_its_share_of_the_cpu_per_stream(tmp_path, capsys):
    stacks = tmp_path / "stacks.txt"
    stacks.write_text("\n".join(LINES) + "\n")
    stacksplit.main([str(stacks), "--ms-per-stream=1.08"])
    rows = capsys.readouterr().out.splitlines()
    assert rows[:2] == ["| part of one stream | µs | share |", "|---|---|---|"]
    assert rows[2] == f"| {stacksplit.LOOP} | 740 | 69% |"  # 74 of 108 samples, 10 µs each
    assert len(rows) == 2 + 10
