"""Drive Debian's Chromium with Playwright's async API, on a thread of its own.

pytest-tornado gives every test a fresh IOLoop, and Playwright objects belong to
the asyncio loop that created them. So one browser, shared by a test module,
lives on a dedicated thread with its own event loop, while each test body runs
on its IOLoop, which keeps serving the relay. A test hands a coroutine over
with ``await browser.run(coro)``: the coroutine (e.g. ``page.click("#send")``,
or an ``async def`` helper that takes the page) runs on the browser's loop and
the test's loop stays free while it waits.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from typing import Any

from playwright.async_api import Browser, BrowserContext, Page, async_playwright

CHROMIUM = "/usr/bin/chromium"
ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


class BrowserThread:
    """A headless Chromium and the event loop thread that owns it."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="browser", daemon=True)
        self._thread.start()
        self._playwright = None
        self.browser: Browser | None = None
        try:
            self.call(self._start())
        except BaseException:
            self.close()
            raise

    async def _start(self) -> None:
        self._playwright = await async_playwright().start()
        self.browser = await self._playwright.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=ARGS
        )

    def call(self, coro: Coroutine[Any, Any, Any], timeout: float = 30) -> Any:
        """Run ``coro`` on the browser's loop and block for its result (outside any loop)."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    async def run(self, coro: Coroutine[Any, Any, Any]) -> Any:
        """Run ``coro`` on the browser's loop and await its result from another loop."""
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, self.loop))

    def new_page(self, **context_options: Any) -> ChatPage:
        return self.call(self._new_page(context_options))

    async def _new_page(self, options: dict[str, Any]) -> ChatPage:
        assert self.browser is not None
        context = await self.browser.new_context(**options)
        context.set_default_timeout(10_000)
        page = await context.new_page()
        return ChatPage(self, context, page)

    def close(self) -> None:
        async def stop() -> None:
            if self.browser is not None:
                await self.browser.close()
            if self._playwright is not None:
                await self._playwright.stop()

        try:
            if self._thread.is_alive():
                self.call(stop())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)
            if not self._thread.is_alive():
                self.loop.close()


class ChatPage:
    """One browser context and page, with the JavaScript errors it raised."""

    def __init__(self, owner: BrowserThread, context: BrowserContext, page: Page) -> None:
        self.owner = owner
        self.context = context
        self.page = page
        self.errors: list[str] = []
        page.on("pageerror", lambda exc: self.errors.append(str(exc)))

    async def run(self, coro: Coroutine[Any, Any, Any]) -> Any:
        return await self.owner.run(coro)

    def close(self) -> None:
        self.owner.call(self.context.close())
