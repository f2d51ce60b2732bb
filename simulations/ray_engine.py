"""The Ray engine: the same apps on Flower's simulation runtime (the path to multi-machine simulation)."""

from __future__ import annotations

import os
import socket
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomli_w
from flwr.app import Context, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import ServerApp

from common import ConfigError


def ray_current_cluster() -> Path:
    """Where `ray start` leaves the address of the cluster it started on this machine (what "auto" reads):
    Ray's temp folder, $RAY_TMPDIR or $TMPDIR or /tmp, then ray/."""
    root = os.environ.get("RAY_TMPDIR") or os.environ.get("TMPDIR") or "/tmp"
    return Path(root) / "ray" / "ray_current_cluster"


@dataclass(frozen=True)
class RayOptions:
    """address: "" starts a private Ray on this machine; "auto" or HOST:PORT joins a running cluster (its
    head's GCS address, what `ray start --head --port PORT` printed), so client actors can run on every node.
    gpus_per_client: the share of a GPU each client actor reserves (Ray places and packs actors by it)."""

    address: str = ""
    gpus_per_client: float = 0.0
    cpus_per_client: float = 2.0

    def __post_init__(self) -> None:
        if self.gpus_per_client < 0:
            raise ConfigError(f"--gpus-per-client {self.gpus_per_client} must be >= 0, e.g. 0.5 (two clients "
                              "share a GPU) or 1")
        if self.cpus_per_client <= 0:
            raise ConfigError(f"--cpus-per-client {self.cpus_per_client} must be > 0, e.g. 1")


def check_ray_address(address: str, timeout: float = 3.0) -> str:
    """The cluster's HOST:PORT, answering; else a one-line error (Ray itself would retry for minutes)."""
    given = address
    if address == "auto":
        address = os.environ.get("RAY_ADDRESS", "")
        if not address and ray_current_cluster().is_file():
            address = ray_current_cluster().read_text().strip()
        if not address:
            raise ConfigError("--ray-address auto: no Ray cluster was started on this machine; start one "
                              "(`ray start --head --port 6379`) or give the head's HOST:PORT")
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ConfigError(f"--ray-address {given!r} is not HOST:PORT or auto; give the head node's address, "
                          "e.g. 10.0.0.5:6379")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as exc:
        raise ConfigError(f"--ray-address {given}: nothing answers at {host}:{port} ({exc.strerror or exc}); "
                          f"start the head (`ray start --head --port {port}`) or check the address") from None
    return f"{host}:{port}"


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
            options: RayOptions | None = None) -> None:
    """options.cpus_per_client: Ray gives each client actor this many cores (and torch as many threads);
    Flower's default, 2, also matches the in-process engine's threads on a 2-core machine, so both compute
    alike."""
    options = options or RayOptions()
    # Imported here: the Ray runtime costs seconds to import and the in-process engine never needs it.
    from flwr.simulation.run_simulation import _run_simulation
    from flwr.supercore.telemetry import EventType

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    init_args: dict[str, Any] = {"include_dashboard": False}
    if options.address:  # a cluster brings its own resources: Ray refuses num_cpus when joining one
        init_args["address"] = check_ray_address(options.address)
    else:
        init_args["num_cpus"] = os.cpu_count() or 1
    backend_config = {
        "client_resources": {"num_cpus": options.cpus_per_client, "num_gpus": options.gpus_per_client},
        "init_args": init_args,
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
