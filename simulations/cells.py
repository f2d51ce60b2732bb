"""The cells of a grid (compare, sweep): one run config each, one run folder each, run only when unfinished.

A cell is finished when its folder holds the records of exactly its run config through the last round:
config.toml equal to the cell's config, metrics.json with round `num-rounds`, model.pt, and for a DP run
privacy.json and report.html. A cell that is missing or unfinished, or whose config changed, is run again
from its first round (a DP client's ledger lives in the in-process client state, which does not survive
the process, so a checkpoint resume would under-count its privacy).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common import ConfigError

RUNS = "runs"
# Keys that may differ between a cell's plan and its records without making the records stale: where the
# folder is (the grid may have been moved) and the resume pointer.
_LOCATION_KEYS = ("out-dir", "resume-from")


@dataclass(frozen=True)
class Cell:
    """One run of a grid. `labels` say what the cell varies (setting, privacy, seed, swept keys);
    `node_configs` is None for the usual one-partition-per-client simulation, or the nodes to start
    (e.g. one node holding a data file)."""

    name: str
    labels: Mapping[str, Any]
    run_config: Mapping[str, Any]
    node_configs: tuple[Mapping[str, Any], ...] | None = None

    @property
    def run_dir(self) -> Path:
        return Path(str(self.run_config["out-dir"]))

    @property
    def private(self) -> bool:
        return str(self.run_config.get("dp", "none")) != "none"


@dataclass
class GridResult:
    ran: list[Cell] = field(default_factory=list)
    skipped: list[Cell] = field(default_factory=list)


def cell_folder_name(parts: Sequence[str]) -> str:
    """A folder name from label parts: lowercase, [a-z0-9.=-] and '_' between parts."""
    safe = ["".join(ch if ch.isalnum() or ch in ".=-" else "-" for ch in str(p).lower()) for p in parts]
    return "_".join(safe)


def is_finished(cell: Cell) -> bool:
    folder = cell.run_dir
    try:
        recorded = tomllib.loads((folder / "config.toml").read_text())
        rounds = json.loads((folder / "metrics.json").read_text())["rounds"]
    except (OSError, ValueError, KeyError):
        return False
    if _comparable(recorded) != _comparable(cell.run_config):
        return False
    if not rounds or rounds[-1].get("round") != int(cell.run_config["num-rounds"]):
        return False
    needed = ["model.pt"] + (["privacy.json", "report.html"] if cell.private else [])
    return all((folder / name).is_file() for name in needed)


def _comparable(config: Mapping[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in config.items() if k not in _LOCATION_KEYS}
    if out.get("data-dir"):
        # A subset folder is named for its content, so its name is what matters, not where the grid lives.
        out["data-dir"] = Path(str(out["data-dir"])).name
    return out


def run_cell(cell: Cell) -> None:
    """Run one cell to completion in this process, from a clean folder."""
    from simulations.runconfig import validate

    shutil.rmtree(cell.run_dir, ignore_errors=True)
    if cell.node_configs is None:
        from simulations.simulate import simulate

        simulate(dict(cell.run_config))
        return
    from client.app import app as client_app
    from server.app import app as server_app
    from simulations.inprocess import run_inprocess

    validate(dict(cell.run_config))
    nodes = [dict(n) for n in cell.node_configs]
    run_inprocess(server_app, client_app, nodes, dict(cell.run_config))
    # config.toml cannot say which data the nodes held (e.g. the centralized union file): this does.
    (cell.run_dir / "nodes.json").write_text(json.dumps(nodes, indent=1) + "\n")


def run_grid(cells: Sequence[Cell], echo: Callable[[str], None] = print) -> GridResult:
    """Run every unfinished cell in order; a finished one is skipped. Cells must have distinct folders."""
    folders = [c.run_dir for c in cells]
    if len(set(folders)) != len(folders):
        dup = next(f for f in folders if folders.count(f) > 1)
        raise ConfigError(f"two cells of the grid would write to {dup}; give each a distinct seed or value")
    logging.getLogger("flwr").setLevel(logging.WARNING)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    result = GridResult()
    for i, cell in enumerate(cells, start=1):
        head = f"[{i}/{len(cells)}] {cell.name}"
        if is_finished(cell):
            echo(f"{head}: finished earlier, kept")
            result.skipped.append(cell)
            continue
        echo(f"{head}: running")
        started = time.perf_counter()
        run_cell(cell)
        if not is_finished(cell):
            raise RuntimeError(f"cell {cell.name} ended without complete records in {cell.run_dir}")
        echo(f"{head}: done in {time.perf_counter() - started:.0f} s")
        result.ran.append(cell)
    return result
