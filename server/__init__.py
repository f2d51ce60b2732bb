"""The coordinator: ServerApp, strategies, checks on updates, records.

Names are imported on first use (PEP 562), so that `from server import ServerConfig` does not import Flower.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {"STRATEGIES": "server.config", "ServerConfig": "server.config", "run_federation": "server.federation"}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'server' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value
