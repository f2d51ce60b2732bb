"""The coordinator: ServerApp, strategies, checks on updates, records."""

from server.config import STRATEGIES, ServerConfig
from server.federation import run_federation

__all__ = ["STRATEGIES", "ServerConfig", "run_federation"]
