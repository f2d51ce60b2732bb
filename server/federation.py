"""One federated run, start to records: what the ServerApp does, whatever engine delivers its messages."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord
from flwr.serverapp import Grid
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from client import DataConfig, TrainConfig, evaluate, load_dataset
from models import build_model
from server.config import ServerConfig
from server.records import RunRecords
from server.rounds import LoopSettings, RoundRecord, run_rounds
from server.strategies import build_strategy

log = logging.getLogger("fedpriv")


def run_federation(grid: Grid, run_config: Mapping[str, Any], *, progress: bool = True) -> dict[str, Any]:
    """Train for the configured rounds and keep the records current; returns the final server metrics."""
    data_cfg = DataConfig.from_run_config(run_config)
    train_cfg = TrainConfig.from_run_config(run_config)
    server_cfg = ServerConfig.from_run_config(run_config)

    dataset = load_dataset(data_cfg.dataset, data_cfg.data_dir or None)
    model = build_model(train_cfg.model, dataset.spec, seed=server_cfg.seed)
    records = RunRecords(Path(server_cfg.out_dir), run_config)

    def evaluate_global(server_round: int, arrays: ArrayRecord) -> dict[str, float]:
        model.load_state_dict(arrays.to_torch_state_dict())
        return evaluate(model, dataset.x_test, dataset.y_test)

    arrays = ArrayRecord(model.state_dict())
    records.add_round(RoundRecord(round=0, server=evaluate_global(0, arrays)).as_dict())

    settings = LoopSettings(
        num_rounds=server_cfg.num_rounds,
        fraction_train=server_cfg.fraction_train,
        fraction_evaluate=server_cfg.fraction_evaluate,
        seed=server_cfg.seed,
        round_timeout=server_cfg.round_timeout,
        min_clients=server_cfg.min_clients,
    )
    strategy = build_strategy(server_cfg, proximal_mu=train_cfg.proximal_mu)
    bar = Progress(TextColumn("[bold]rounds"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.description}"),
                   TimeElapsedColumn(), console=Console(stderr=True), disable=not progress)

    with bar:
        task = bar.add_task("", total=server_cfg.num_rounds)

        def on_round(record: RoundRecord, arrays: ArrayRecord) -> None:
            records.add_round(record.as_dict())
            acc = record.server.get("accuracy", float("nan"))
            bar.update(task, completed=record.round, description=f"server accuracy {acc:.4f}")

        arrays = run_rounds(grid, strategy, arrays, settings, evaluate_global, on_round)

    records.save_model(arrays.to_torch_state_dict())
    return records.final_server_metrics()
