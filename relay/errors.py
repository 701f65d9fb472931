"""The relay's error type and the one place that scrubs secrets from text.

Every failure the contract names is a `RelayError`: an HTTP status for when
the stream has not started yet, and a stable ``code`` for the JSON body or the
``event: error`` frame once it has.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TypeVar

import ujson


class RelayError(Exception):
    """A failure with a contract code, an HTTP status and a message safe to show."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message

    def body(self) -> bytes:
        """The JSON error document: ``{"error": {"code": ..., "message": ...}}``."""
        doc = {"error": {"code": self.code, "message": self.message}}
        return ujson.dumps(doc, ensure_ascii=False).encode()

    def __repr__(self) -> str:
        return f"RelayError({self.status}, {self.code!r}, {self.message!r})"


def redact(text: str, secrets: Iterable[str]) -> str:
    """Replace every configured secret found in ``text`` (upstream error bodies
    sometimes echo part of a key) with ``[redacted]``."""
    for secret in secrets:
        if secret and secret in text:
            text = text.replace(secret, "[redacted]")
    return text


E = TypeVar("E", bound=BaseException)


def detached(error: E) -> E:
    """``error`` without its traceback or chained exceptions, to keep after the except block.

    Kept whole, an exception holds the frames it passed through, and they hold
    it back: a reference cycle that only a full GC pass frees, and the server
    runs those rarely (see relay/serve.py).
    """
    error.__traceback__ = None
    error.__context__ = None
    error.__cause__ = None
    return error
