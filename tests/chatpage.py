"""Helpers for the chat page's tests (tests/test_page*.py): page actions that run on the
browser's loop (hand them over with ``await chat.run(...)``), and fake-upstream scripts.

The page keeps the Markdown source of each answer (``conversation()``, exported by
static/app.js, which `open_page` makes ``window.relayPage``); the tests compare texts
with it, and what was rendered with the DOM.
"""

from __future__ import annotations

import asyncio
import os

import pytest

from tests.browser import CHROMIUM, ChatPage
from tests.fakeupstream import answer_frames, start_stream

TIMEOUT = 30

needs_chromium = pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="no Chromium here")

TURN_INFO = """n => {
  const t = document.querySelectorAll('.turn')[n];
  if (!t) return null;
  const error = t.querySelector('.error');
  return {
    state: t.dataset.state,
    question: t.querySelector('.question').textContent,
    text: window.relayPage.conversation()[n].a,
    html: t.querySelector('.text').innerHTML,
    rendered: t.querySelector('.body').innerText,
    error: error.hidden ? null : t.querySelector('.error-text').textContent,
    retry: !error.hidden && getComputedStyle(t.querySelector('.retry')).display !== 'none',
    stats: t.querySelector('.meta').hidden ? null : t.querySelector('.stats').textContent,
    cursor: getComputedStyle(t.querySelector('.cursor')).display !== 'none',
    finish: t.querySelector('.finish-note').hidden ? null
      : t.querySelector('.finish-note').textContent,
  };
}"""


async def open_page(page, url: str) -> None:
    """Load (or reload) the page and wait until it is ready."""
    await page.goto(url + "/")
    await page.wait_for_selector("html[data-ready]", state="attached")
    await page.evaluate("import('/static/app.js').then(m => { window.relayPage = m; })")


async def ask(page, question: str) -> None:
    await page.fill("#question", question)
    await page.press("#question", "Enter")


async def turn_info(page, n: int = 0) -> dict | None:
    return await page.evaluate(TURN_INFO, n)


async def wait_state(page, n: int, *states: str) -> dict:
    await page.wait_for_function(
        "([n, states]) => { const t = document.querySelectorAll('.turn')[n];"
        " return !!t && states.includes(t.dataset.state); }",
        arg=[n, list(states)],
    )
    return await turn_info(page, n)


async def wait_text(page, n: int, text: str) -> None:
    """Until turn ``n``'s answer (its Markdown source) is ``text``."""
    await page.wait_for_function(
        "([n, text]) => window.relayPage.conversation()[n]?.a === text", arg=[n, text]
    )


async def record_console(page, messages: list[str]) -> None:
    """Keep the page's console errors and warnings (a CSP violation is reported there)."""

    def on_console(message) -> None:
        if message.type in ("error", "warning"):
            messages.append(f"{message.type}: {message.text}")

    page.on("console", on_console)


async def wait_until(predicate, timeout: float = 10) -> None:
    """Poll a condition on the test's own loop (relay state)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


def gated(tokens: list[str], first: int, gate: asyncio.Event):
    """A fake-upstream script: the first ``first`` tokens, then wait for ``gate``, then the rest."""
    frames = answer_frames(tokens)

    async def script(handler, body, key):
        start_stream(handler)
        for frame in frames[: first + 1]:  # the role chunk, then ``first`` tokens
            await handler.send(frame)
        await gate.wait()
        for frame in frames[first + 1 :]:
            await handler.send(frame)

    return script


def hanging(tokens: list[str], seconds: float = 30):
    """Some tokens, then silence (no finish, no [DONE])."""
    frames = answer_frames(tokens, finish=False)

    async def script(handler, body, key):
        start_stream(handler)
        for frame in frames:
            await handler.send(frame)
        await asyncio.sleep(seconds)

    return script


MODES = pytest.mark.parametrize("mode", ["oneshot", "resumable"])


async def open_in_mode(chat: ChatPage, url: str, mode: str) -> None:
    await chat.run(open_page(chat.page, url))
    if mode == "resumable":
        await chat.run(chat.page.check("#resumable"))
