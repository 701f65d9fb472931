"""The upstream API keys: picked at random or in turn; a key the upstream refused cools down."""

from __future__ import annotations

import random
import time
from collections.abc import Sequence

# Seconds a key answered 401/403/429 is passed over while another key is warm.
KEY_COOLDOWN = 60.0


class KeyPool:
    """Upstream API keys, picked ``random`` or ``round_robin``; refused keys cool down."""

    def __init__(self, keys: Sequence[str], strategy: str = "random") -> None:
        self.keys = list(keys)
        self.strategy = strategy
        self._next = 0
        self._cool_until: dict[str, float] = {}

    def pick(self, exclude: set[str]) -> str | None:
        """A key not in ``exclude``, preferring keys that are not cooling down.

        Returns None when there are no keys at all, or all were tried.
        """
        candidates = [k for k in self.keys if k not in exclude]
        if not candidates:
            return None
        now = time.monotonic()
        warm = [k for k in candidates if self._cool_until.get(k, 0.0) <= now]
        if not warm:
            return min(candidates, key=lambda k: self._cool_until[k])
        if self.strategy == "round_robin":
            key = warm[self._next % len(warm)]
            self._next += 1
            return key
        return random.choice(warm)  # noqa: S311 - spreading load, not a secret

    def cool(self, key: str, seconds: float = KEY_COOLDOWN) -> None:
        self._cool_until[key] = time.monotonic() + seconds

    def cooling(self) -> int:
        now = time.monotonic()
        return sum(1 for until in self._cool_until.values() if until > now)
