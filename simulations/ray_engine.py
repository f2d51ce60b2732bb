"""The Ray engine: the same apps on Flower's simulation runtime (the path to multi-machine simulation)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import tomli_w
from flwr.app import Context, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import ServerApp


def _app_dir(run_config: Mapping[str, Any], where: Path) -> Path:
    """Flower's runtime reads each SuperNode's run config from an app folder's pyproject.toml; write one
    holding this run's resolved config, so the clients see exactly what the server sees."""
    project = {
        "project": {"name": "fedpriv-run", "version": "0.0.0"},
        "tool": {"flwr": {"app": {
            "publisher": "fedpriv",
            "components": {"serverapp": "server.app:app", "clientapp": "client.app:app"},
            "config": dict(run_config),
        }}},
    }
    where.mkdir(parents=True, exist_ok=True)
    (where / "pyproject.toml").write_text(tomli_w.dumps(project))
    return where


def run_ray(server_app: ServerApp, client_app: ClientApp, num_clients: int, run_config: Mapping[str, Any],
            cpus_per_client: float = 2.0) -> None:
    """cpus_per_client: Ray gives each client actor this many cores (and torch as many threads); Flower's
    default, 2, also matches the in-process engine's threads on a 2-core machine, so both compute alike."""
    # Imported here: the Ray runtime costs seconds to import and the in-process engine never needs it.
    from flwr.simulation.run_simulation import _run_simulation
    from flwr.supercore.telemetry import EventType

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    backend_config = {
        "client_resources": {"num_cpus": cpus_per_client, "num_gpus": 0.0},
        "init_args": {"num_cpus": os.cpu_count() or 1, "include_dashboard": False},
    }
    context = Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config=dict(run_config))
    with tempfile.TemporaryDirectory(prefix="fedpriv-ray-") as tmp:
        app_dir = _app_dir(run_config, Path(tmp))
        # flwr.simulation.run_simulation is deprecated and passes no run config; its worker takes one.
        _run_simulation(
            num_supernodes=num_clients,
            exit_event=EventType.PYTHON_API_RUN_SIMULATION_LEAVE,
            client_app=client_app,
            server_app=server_app,
            backend_config=backend_config,
            server_app_context=context,
            app_dir=str(app_dir),
            is_app=True,  # without it the runtime ignores app_dir and clients get an empty run config
        )
