"""Robots: the chat personas of the config file's ``[[robots]]`` table."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from relay.errors import ConfigError


@dataclass(frozen=True, slots=True)
class Robot:
    """One chat persona from the ``[[robots]]`` table of the config file."""

    robot_id: str
    name: str
    model: str | None = None
    system_prompt: str = ""
    temperature: float | None = None
    top_p: float | None = None
    include_usage: bool | None = None  # None: --include-usage decides


DEFAULT_ROBOTS = (Robot("1", "Assistant", system_prompt="You are a helpful assistant."),)


def parse_robots(raw: Any, path: str) -> tuple[Robot, ...]:
    """The robots of the config file at ``path`` (the default robot when it names none)."""
    if raw is None:
        return DEFAULT_ROBOTS
    if not isinstance(raw, list) or not raw:
        raise ConfigError(f"{path}: robots must be a non-empty array of tables")
    robots = []
    for entry in raw:
        try:
            robot = Robot(
                robot_id=str(entry["robotId"]),
                name=str(entry["robotName"]),
                model=entry.get("model"),
                system_prompt=str(entry.get("systemPrompt", "")),
                temperature=_opt_float(entry.get("temperature")),
                top_p=_opt_float(entry.get("topP")),
                include_usage=entry.get("includeUsage"),
            )
        except (KeyError, TypeError, ValueError):
            raise ConfigError(f"{path}: each robot needs robotId and robotName") from None
        if robot.include_usage is not None and not isinstance(robot.include_usage, bool):
            raise ConfigError(f"{path}: a robot's includeUsage must be true or false")
        robots.append(robot)
    if len({r.robot_id for r in robots}) != len(robots):
        raise ConfigError(f"{path}: robotId values must be unique")
    return tuple(robots)


def _opt_float(value: Any) -> float | None:
    return None if value is None else float(value)
