"""`fedpriv compare` and `fedpriv sweep` on small real runs (digits / mlp): outputs, resumability, the
centralized baseline, the natural-client baseline, sweeps and their privacy note, and bad input."""

from __future__ import annotations

import csv
import dataclasses
import json
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch

from common import ConfigError, DataConfig, DataError, partition_data
from simulations.cells import is_finished
from simulations.centralized import CENTRAL_CLIENT_ID, centralized_run
from simulations.cli import main
from simulations.compare import CompareConfig, compare, load_compare_config, plan_cells
from simulations.comparison_report import COLUMNS
from simulations.sweep import parse_sweep, selection_note

TINY = """
[compare]
seeds = [1, 2]
centralized = true
partitions = ["iid", "dirichlet:1.0"]
target-epsilons = [30.0]
target-accuracy = 0.3

[run]
dataset = "digits"
model = "mlp"
num-clients = 3
num-rounds = 2
learning-rate = 0.1
"""
SETTINGS = {"centralized", "federated iid", "federated dirichlet:1.0"}
PRIVACY = {"none", "dp eps=30"}
FIGURES = ("fig_accuracy_vs_work.png", "fig_accuracy_vs_epsilon.png", "fig_accuracy_vs_alpha.png",
           "fig_client_spread.png")


def quiet(_: str) -> None:
    pass


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    torch.set_num_threads(1)
    folder = tmp_path_factory.mktemp("compare")
    (folder / "tiny.toml").write_text(TINY)
    config = load_compare_config(path=folder / "tiny.toml")
    result = compare(config, folder / "out", echo=quiet)
    return config, result


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_compare_writes_every_output_with_one_row_per_cell(grid):
    config, result = grid
    out = result.out
    for name in ("comparison.csv", "comparison.json", "comparison.md", "comparison.html", *FIGURES):
        assert (out / name).is_file(), name
    for name in FIGURES:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"]({name})" in (out / "comparison.md").read_text()

    with open(out / "comparison.csv", newline="") as f:
        assert next(csv.reader(f)) == list(COLUMNS)
    rows = read_csv(out / "comparison.csv")
    assert len(rows) == 3 * 2 * 2  # settings x privacy levels x seeds
    assert {(r["setting"], r["privacy"], r["seed"]) for r in rows} == {
        (s, p, str(seed)) for s in SETTINGS for p in PRIVACY for seed in (1, 2)}

    document = json.loads((out / "comparison.json").read_text())
    assert document["columns"] == list(COLUMNS) and len(document["rows"]) == 12
    groups = {(s["setting"], s["privacy"]) for s in document["summary"]}
    assert groups == {(s, p) for s in SETTINGS for p in PRIVACY}
    assert all(s["seeds"] == 2 for s in document["summary"])
    for row in document["rows"]:
        assert 0.0 <= row["final_accuracy"] <= row["best_accuracy"] <= 1.0
        assert row["rounds"] == 2 and row["dropped_updates"] == 0
        if row["privacy"] == "none":
            assert row["epsilon"] is None
        else:  # calibrated to the target, measured from privacy.json
            assert 25.0 < row["epsilon"] <= 30.0 + 1e-6
            assert (out / row["run_dir"] / "report.html").is_file()
        if row["rounds_to_target"] is not None:
            assert row["final_accuracy"] >= 0.3 or row["best_accuracy"] >= 0.3
    # It learned: the non-private centralized baseline beats chance (10 classes) clearly.
    central = [r for r in document["rows"] if r["setting"] == "centralized" and r["privacy"] == "none"]
    assert min(r["final_accuracy"] for r in central) > 0.5
    assert result.files["privacy_report"].is_file()


def test_centralized_cell_is_one_client_with_every_example(grid):
    _, result = grid
    out = result.out
    central = out / "runs" / "centralized_no-dp_seed1"
    federated = out / "runs" / "federated-iid_no-dp_seed1"
    config = tomllib.loads((central / "config.toml").read_text())
    assert config["num-clients"] == 1
    rounds = json.loads((central / "metrics.json").read_text())["rounds"]
    assert all(len(r["train"]) == 1 for r in rounds[1:])
    fed_rounds = json.loads((federated / "metrics.json").read_text())["rounds"]
    assert all(len(r["train"]) == 3 for r in fed_rounds[1:])
    central_n = rounds[1]["train"][0]["metrics"]["num-examples"]
    fed_n = sum(e["metrics"]["num-examples"] for e in fed_rounds[1]["train"])
    # Each side holds out 10% for validation; rounding per client differs by at most one example each.
    assert abs(central_n - fed_n) <= 3
    # Everything else is the same run config.
    fed_config = tomllib.loads((federated / "config.toml").read_text())
    differ = {k for k in config if config[k] != fed_config[k]}
    assert differ == {"num-clients", "out-dir"}


def test_second_call_runs_nothing_and_a_lost_cell_is_rerun(grid):
    config, result = grid
    out = result.out
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("runs/*/metrics.json")}
    assert len(stamps) == 12
    again = compare(config, out, echo=quiet)
    assert again.grid.ran == [] and len(again.grid.skipped) == 12
    assert {p: p.stat().st_mtime_ns for p in out.glob("runs/*/metrics.json")} == stamps

    # A cell whose final records are missing (an interrupted run) is run again, and only that one.
    lost = out / "runs" / "federated-iid_dp-eps30_seed2"
    (lost / "model.pt").unlink()
    third = compare(config, out, echo=quiet)
    assert [c.name for c in third.grid.ran] == ["federated-iid_dp-eps30_seed2"]
    assert (lost / "model.pt").is_file()


def test_changing_the_grid_reruns_only_the_changed_cells(grid, tmp_path):
    config, result = grid
    cells = plan_cells(config, result.out)
    assert all(is_finished(c) for c in cells)
    more_rounds = CompareConfig(**{**config.__dict__, "run": {**config.run, "num-rounds": 3}})
    assert not any(is_finished(c) for c in plan_cells(more_rounds, result.out))


def test_natural_partition_baseline_holds_exactly_the_natural_clients_data(tmp_path):
    run = {"dataset": "shakespeare", "partition": "natural", "num-clients": 3, "model": "lstm", "seed": 1,
           "holdout-fraction": 0.1}
    central, nodes = centralized_run(run, tmp_path)
    assert central["num-clients"] == 1 and nodes is not None and len(nodes) == 1
    assert nodes[0]["client-id"] == CENTRAL_CLIENT_ID
    with np.load(nodes[0]["data-path"]) as union:
        x, y = union["x"], union["y"]
    data = DataConfig.from_run_config(run)
    parts = [partition_data(data, i) for i in range(3)]
    assert len(y) == sum(p.num_examples + len(p.y_val) for p in parts)
    assert np.array_equal(x[: parts[0].num_examples], parts[0].x_train)
    # Another text-stride is other examples: its own union, not the cached one.
    _, strided = centralized_run({**run, "text-stride": 40}, tmp_path)
    assert strided is not None and strided[0]["data-path"] != nodes[0]["data-path"]
    with np.load(strided[0]["data-path"]) as union:
        assert len(union["y"]) == sum(p.num_examples + len(p.y_val) for p in (
            partition_data(dataclasses.replace(data, text_stride=40), i) for i in range(3)))
    # A label partition needs no file: the same run with one client.
    iid, none = centralized_run({**run, "dataset": "digits", "partition": "dirichlet:0.3", "model": "mlp"},
                                tmp_path)
    assert none is None and iid["num-clients"] == 1 and iid["partition"] == "iid"


def test_bad_grids_fail_with_one_line_naming_the_fix(tmp_path):
    with pytest.raises(ConfigError, match="'partition'.*use partitions"):
        CompareConfig(run={"partition": "iid"})
    with pytest.raises(ConfigError, match="target-epsilons"):
        CompareConfig(run={}, target_epsilons=(0.0,))
    with pytest.raises(ConfigError, match="lists one partition twice"):
        CompareConfig(run={}, partitions=("iid", "IID"))
    with pytest.raises(DataError, match="dirichlet alpha"):
        CompareConfig(run={}, partitions=("dirichlet:-1",))
    bad = tmp_path / "bad.toml"
    bad.write_text("[compare]\nseed = [1]\n")
    with pytest.raises(ConfigError, match="unknown key 'compare.seed'"):
        load_compare_config(path=bad)
    bad.write_text("[compare]\nseeds = 3\n")
    with pytest.raises(ConfigError, match="seeds = 3 has the wrong type"):
        load_compare_config(path=bad)
    with pytest.raises(ConfigError, match="unknown config key 'num-round'"):
        plan_cells(CompareConfig(run={"num-round": 3}), tmp_path)
    with pytest.raises(ConfigError, match="cannot shrink dataset 'digits'"):
        plan_cells(CompareConfig(run={"dataset": "digits"}, max_train_examples=100), tmp_path)
    assert main(["compare", "--config", str(tmp_path / "missing.toml"), "--out", str(tmp_path / "o")]) == 2


def test_dp_run_keys_apply_to_the_dp_cells_only(tmp_path):
    config = CompareConfig(run={"dataset": "digits", "model": "mlp", "batch-size": 32},
                           dp_run={"batch-size": 128, "learning-rate": 0.5}, target_epsilons=(5.0,))
    cells = plan_cells(config, tmp_path)
    assert len(cells) == 4  # centralized and iid, each without DP and at epsilon 5
    for cell in cells:
        private = cell.labels["target_epsilon"] is not None
        assert cell.run_config["batch-size"] == (128 if private else 32)
        assert cell.run_config["learning-rate"] == (0.5 if private else 0.05)
        assert cell.run_config["dp"] == ("sample" if private else "none")
    with pytest.raises(ConfigError, match=r"\[dp-run\] sets 'seed'"):
        CompareConfig(run={}, dp_run={"seed": 3})


ARMS = """
[compare]
seeds = [1]
partitions = ["iid"]
target-epsilons = [30.0]
target-accuracy = 0.3

[run]
dataset = "digits"
model = "mlp"
num-clients = 3
num-rounds = 2
batch-size = 32

[dp-run]
learning-rate = 0.3

[arms.small]
learning-rate = 0.1
[arms.small.dp-run]
batch-size = 64

[arms.big]
num-rounds = 3
[arms.big.centralized]
learning-rate = 0.2
"""


def test_arms_layer_their_keys_and_run_as_separate_lines(tmp_path):
    (tmp_path / "arms.toml").write_text(ARMS)
    config = load_compare_config(path=tmp_path / "arms.toml")
    cells = {c.name: c.run_config for c in plan_cells(config, tmp_path / "out")}
    # 2 arms x (centralized, iid) x (no DP, epsilon 30); each arm's cells in its own folders.
    assert len(cells) == 8 and all(name.split("_")[0] in ("small", "big") for name in cells)
    # [run] < [dp-run] < [arms.A] < [arms.A.dp-run] < [arms.A.centralized]
    assert cells["small_federated-iid_no-dp_seed1"]["learning-rate"] == 0.1
    assert cells["small_federated-iid_dp-eps30_seed1"]["learning-rate"] == 0.1
    assert cells["small_federated-iid_dp-eps30_seed1"]["batch-size"] == 64
    assert cells["small_federated-iid_no-dp_seed1"]["batch-size"] == 32
    assert cells["big_federated-iid_dp-eps30_seed1"]["learning-rate"] == 0.3
    assert cells["big_centralized_dp-eps30_seed1"]["learning-rate"] == 0.2
    assert cells["big_centralized_no-dp_seed1"]["num-rounds"] == 3
    assert cells["small_centralized_no-dp_seed1"]["num-rounds"] == 2

    torch.set_num_threads(1)
    result = compare(config, tmp_path / "out", echo=quiet)
    rows = read_csv(result.files["csv"])
    assert {(r["arm"], r["series"]) for r in rows} == {
        (a, f"{a}: {s}") for a in ("small", "big") for s in ("centralized", "federated iid")}
    assert {r["rounds"] for r in rows if r["arm"] == "big"} == {"3"}
    summary = json.loads(result.files["json"].read_text())["summary"]
    assert len(summary) == 8 and {s["arm"] for s in summary} == {"small", "big"}
    md = result.files["md"].read_text()
    assert "Arm small" in md and "Arm big" in md and "big: federated iid" in md
    assert (result.out / "fig_accuracy_vs_epsilon.png").is_file()


def test_bad_arms_fail_with_one_line_naming_the_fix(tmp_path):
    with pytest.raises(ConfigError, match=r"\[arms.a.dp-run\] sets 'seed'"):
        CompareConfig(run={}, arms={"a": {"dp-run": {"seed": 1}}})
    with pytest.raises(ConfigError, match="arm name 'Big Arm' is not allowed"):
        CompareConfig(run={}, arms={"Big Arm": {}})
    with pytest.raises(ConfigError, match=r"\[arms.a\] must be a table"):
        CompareConfig(run={}, arms={"a": {"centralized": 3}})
    bad = tmp_path / "bad.toml"
    bad.write_text("[run]\n[arms]\nmodel = 'cnn'\n")
    with pytest.raises(ConfigError, match=r"one table per arm"):
        load_compare_config(path=bad)
    with pytest.raises(ConfigError, match="unknown config key 'num-round'"):
        plan_cells(CompareConfig(run={}, arms={"a": {"num-round": 3}}), tmp_path)


def test_presets_are_valid_grids():
    for name in ("quick", "full", "shakespeare", "privacy-utility"):
        config = load_compare_config(preset=name)
        assert config.source == f"preset {name}" and config.seeds
    quick = load_compare_config(preset="quick", seeds=[7])
    assert quick.seeds == (7,) and quick.run["dataset"] == "fashion-mnist" and quick.target_epsilons
    assert load_compare_config(preset="shakespeare").partitions == ("natural",)
    utility = load_compare_config(preset="privacy-utility")
    assert set(utility.arms) == {"recipe", "plain-cnn"} and utility.target_epsilons == (1.0, 2.0, 3.0, 8.0)
    cells = plan_cells(utility, Path("/nonexistent/privacy-utility"))
    assert len(cells) == 24 and all(c.run_config["dp"] == "sample" for c in cells)
    assert {c.run_config["model"] for c in cells} == {"scatter-linear", "cnn"}


def test_sweep_runs_every_combination_and_notes_the_selection(tmp_path):
    torch.set_num_threads(1)
    out = tmp_path / "sweep"
    args = ["sweep", "--dataset", "digits", "--model", "mlp", "--num-clients", "2", "--rounds", "1",
            "--set", "learning-rate=0.05,0.2", "--set", "local-epochs=1", "--out", str(out)]
    assert main(args) == 0
    rows = read_csv(out / "sweep.csv")
    assert [r["learning-rate"] for r in rows] == ["0.05", "0.2"]
    for r in rows:
        config = tomllib.loads((out / r["run_dir"] / "config.toml").read_text())
        assert config["local-epochs"] == 1 and config["learning-rate"] == float(r["learning-rate"])
    document = json.loads((out / "sweep.json").read_text())
    assert "No run's epsilon counts it" in document["privacy_note"][0]
    assert "none of these runs is differentially private" in " ".join(document["privacy_note"]).lower()
    html = (out / "sweep.html").read_text()
    assert html.count("<img ") == 1 and "Privacy spent by choosing" in html
    stamp = (out / rows[0]["run_dir"] / "metrics.json").stat().st_mtime_ns
    assert main(args) == 0  # resumes: nothing is rerun
    assert (out / rows[0]["run_dir"] / "metrics.json").stat().st_mtime_ns == stamp


def test_selection_note_sums_the_runs_epsilons():
    rows = [{"epsilon": 2.0, "delta": 1e-5}, {"epsilon": 3.0, "delta": 1e-5},
            {"epsilon": None, "delta": None}]
    text = " ".join(selection_note(rows))
    assert "2 of the 3 runs are DP" in text and "up to 5 (delta 2e-05)" in text
    assert "1.67 times the largest single run's epsilon" in text
    assert "1 of the runs are not DP" in text


def test_sweep_values_are_parsed_with_clear_errors():
    swept, fixed = parse_sweep(["learning-rate=0.01,0.1", "dp=none;sample,user", "seed=3"])
    assert swept == {"learning-rate": ["0.01", "0.1"], "dp": ["none", "sample,user"]}
    assert fixed == {"seed": "3"}
    with pytest.raises(ConfigError, match="not KEY=V1,V2"):
        parse_sweep(["learning-rate"])
    with pytest.raises(ConfigError, match="names 'seed' twice"):
        parse_sweep(["seed=1,2", "seed=3,4"])
    with pytest.raises(ConfigError, match="empty or repeated"):
        parse_sweep(["seed=1,1"])
    with pytest.raises(ConfigError, match="nothing to sweep"):
        parse_sweep(["seed=1"])


@pytest.fixture
def small_shakespeare(monkeypatch):
    """Shakespeare with every 20th training window and 100 test windows, so an LSTM cell takes seconds.
    No run-config key caps examples yet, so the test swaps the loader's cached dataset for a smaller one."""
    import common.datasets as datasets
    import common.task as task

    real = datasets._load_cached
    full = real("shakespeare", None)
    small = dataclasses.replace(full, x_train=full.x_train[::20], y_train=full.y_train[::20],
                                groups=full.groups[::20], x_test=full.x_test[:100], y_test=full.y_test[:100])
    monkeypatch.setattr(datasets, "_load_cached",
                        lambda name, folder, *rest: small if name == "shakespeare" else real(name, folder, *rest))
    task._partitions.cache_clear()  # partitions of the full set must not be reused
    yield small
    task._partitions.cache_clear()


def test_shakespeare_lstm_runs_in_the_grid_with_natural_clients(small_shakespeare, tmp_path):
    torch.set_num_threads(1)
    config = CompareConfig(run={"dataset": "shakespeare", "model": "lstm", "num-clients": 2, "num-rounds": 1,
                                "learning-rate": 0.5, "momentum": 0.0},
                           partitions=("natural",), target_accuracy=0.2)
    result = compare(config, tmp_path / "out", echo=quiet)
    rows = read_csv(result.files["csv"])
    assert [(r["setting"], r["privacy"]) for r in rows] == [("centralized", "none"),
                                                          ("federated natural", "none")]
    runs = tmp_path / "out" / "runs"
    fed = json.loads((runs / "federated-natural_no-dp_seed1" / "metrics.json").read_text())["rounds"][1]
    central = json.loads((runs / "centralized_no-dp_seed1" / "metrics.json").read_text())["rounds"][1]
    assert sorted(e["client_id"] for e in fed["train"]) == ["0", "1"]  # the two largest (play, role) clients
    assert [e["client_id"] for e in central["train"]] == [CENTRAL_CLIENT_ID]
    held = sum(e["metrics"]["num-examples"] for e in fed["train"])
    assert abs(central["train"][0]["metrics"]["num-examples"] - held) <= 2  # the same roles' text
    for r in (fed, central):
        assert 0.0 <= r["server"]["accuracy"] <= 1.0 and r["server"]["loss"] > 0
    assert len(json.loads((runs / "centralized_no-dp_seed1" / "nodes.json").read_text())) == 1
