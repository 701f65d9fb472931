"""Where the page and the default configuration are: package data, or a checkout's top level.

The repository keeps ``static/`` and ``conf/`` at its top level; setup.py maps
them into the wheel as ``relay/static`` and ``relay/conf`` (package data, no
build step). An installed wheel therefore finds them next to this module, and
a checkout (an editable install, or ``python server.py``) one level up.
"""

from __future__ import annotations

import os
from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent


def _data_dir(name: str) -> Path:
    packaged = _PACKAGE / name
    return packaged if packaged.is_dir() else _PACKAGE.parent / name


STATIC_DIR = _data_dir("static")
PACKAGED_CONFIG = _data_dir("conf") / "relay.conf"
LOCAL_CONFIG = Path("conf", "relay.conf")


def default_config() -> str:
    """``./conf/relay.conf`` when the working directory has one, else the packaged default."""
    return os.fspath(LOCAL_CONFIG if LOCAL_CONFIG.is_file() else PACKAGED_CONFIG)
