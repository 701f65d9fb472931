"""How a setting is declared: `setting()` makes a `Settings` field that is also a flag.

`relay.config` declares every setting with it and derives the rest (flags, env
names, file keys, bounds, ``--help``, the docs tables) from the `Setting` records.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Literal, TypeVar

ENV_PREFIX = "RELAY_"

T = TypeVar("T")
Bound = Literal["positive", "not negative"] | None


@dataclass(frozen=True, slots=True)
class Setting:
    """One flag as everything derived from its declaration sees it."""

    name: str
    type: type  # what tornado.options parses: str, int, float or bool
    multiple: bool  # a comma-separated list
    default: Any
    help: str
    bound: Bound = None
    parse: Callable[[Any], Any] | None = None
    choices: tuple[str, ...] = ()
    shown: str | None = None

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.upper()

    @property
    def default_text(self) -> str:
        if self.shown is not None:
            return self.shown
        if self.default in (None, (), {}):
            return "(none)"
        if isinstance(self.default, bool):
            return str(self.default).lower()
        return f"{self.default:g}" if isinstance(self.default, float) else str(self.default)

    def value(self, parsed: Any) -> Any:
        """Tornado's parsed value as the `Settings` field holds it."""
        if self.multiple:
            parsed = [item.strip() for item in parsed if item.strip()]
        if self.parse is not None:
            return self.parse(parsed)
        return tuple(parsed) if self.multiple else parsed


def setting(
    default: T,
    help: str,
    *,
    bound: Bound = None,
    parse: Callable[[Any], T] | None = None,
    choices: tuple[str, ...] = (),
    shown: str | None = None,
) -> T:
    """A `Settings` field that is also a flag, an environment variable and a file key.

    ``help`` is its one meaning (markdown), as both the docs tables and
    ``--help`` show it. ``parse`` turns tornado's value (for a list, its
    stripped non-empty items) into the field's, raising ValueError with the
    reason; ``shown`` is the default as the docs show it, where the value alone
    says too little.
    """
    # The rest of the Setting (name, type, default) comes from the field: see _declared.
    meta = {
        "setting": partial(
            Setting, help=help, bound=bound, parse=parse, choices=choices, shown=shown
        )
    }
    if isinstance(default, dict):  # dataclasses want a fresh mutable default per instance
        return field(default_factory=lambda: copy.copy(default), metadata=meta)
    return field(default=default, metadata=meta)
