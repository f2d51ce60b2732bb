"""Recommended training settings: used when the user gives none, written resolved, never over a given value."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

from common import TrainConfig
from common.config import recommended
from simulations.cli import main
from simulations.runconfig import default_run_config, resolve


def test_not_given_means_recommended_for_the_dataset_and_model() -> None:
    raw = default_run_config()
    assert (raw["learning-rate"], raw["local-epochs"], raw["batch-size"]) == (0.0, 0, 0)
    digits = resolve(None, {"dataset": "digits", "model": "mlp"})
    assert (digits["learning-rate"], digits["local-epochs"], digits["batch-size"]) == (0.05, 5, 32)
    fmnist = resolve(None, {"dataset": "fashion-mnist", "model": "cnn"})
    assert (fmnist["learning-rate"], fmnist["local-epochs"], fmnist["batch-size"]) == (0.05, 1, 64)
    assert resolve(None, {"dataset": "shakespeare", "model": "lstm"})["learning-rate"] == 0.5
    assert recommended("digits", "logreg")["local-epochs"] == 5


def test_a_given_value_always_wins(tmp_path: Path) -> None:
    assert resolve(None, {"dataset": "digits", "local-epochs": 2})["local-epochs"] == 2
    config = tmp_path / "run.toml"
    config.write_text('dataset = "digits"\nbatch-size = 16\nlearning-rate = 0.2\n')
    resolved = resolve(config, {"local-epochs": 3})
    assert (resolved["batch-size"], resolved["learning-rate"], resolved["local-epochs"]) == (16, 0.2, 3)
    # A ClientApp handed a raw run config (`flwr run --run-config`, zeros left in) resolves the same way,
    # and a value given there wins too.
    raw = {**default_run_config(), "dataset": "digits", "model": "mlp", "learning-rate": 0.3}
    cfg = TrainConfig.from_run_config(raw)
    assert (cfg.learning_rate, cfg.local_epochs, cfg.batch_size) == (0.3, 5, 32)


def test_the_plainest_digits_command_reaches_90_percent_and_records_what_ran(tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert main(["simulate", "--dataset", "digits", "--model", "mlp", "--num-clients", "10", "--rounds", "10",
                 "--out", str(out)]) == 0
    config = tomllib.loads((out / "config.toml").read_text())
    assert (config["learning-rate"], config["local-epochs"], config["batch-size"]) == (0.05, 5, 32)
    final = json.loads((out / "metrics.json").read_text())["rounds"][-1]
    assert final["round"] == 10 and final["server"]["accuracy"] >= 0.90, final["server"]


def test_the_server_app_writes_resolved_settings_for_a_raw_run_config(tmp_path: Path) -> None:
    """`flwr run` hands the ServerApp the pyproject table, zeros and all: config.toml still says what ran."""
    import client.app
    import server.app
    from simulations.inprocess import run_inprocess

    raw = {**default_run_config(), "dataset": "digits", "model": "logreg", "num-clients": 2, "num-rounds": 1,
           "out-dir": str(tmp_path / "run")}
    run_inprocess(server.app.app, client.app.app, [{"partition-id": i, "num-partitions": 2} for i in range(2)],
                  raw)
    config = tomllib.loads((tmp_path / "run" / "config.toml").read_text())
    assert (config["learning-rate"], config["local-epochs"], config["batch-size"]) == (0.05, 5, 32)
