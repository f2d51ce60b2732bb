"""End-to-end federated runs on small real data: records, determinism, strategies, bad updates."""

from __future__ import annotations

import csv
import json
import math
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord
from flwr.clientapp import ClientApp

from client.app import app as client_app
from server.app import app as server_app
from simulations.cli import main
from simulations.inprocess import run_inprocess
from simulations.runconfig import default_run_config, resolve

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--dataset", "digits", "--model", "mlp", "--num-clients", "4", "--rounds", "2", "--local-epochs", "2"]


def simulate(tmp_path: Path, *extra: str, name: str = "run") -> Path:
    out = tmp_path / name
    assert main(["simulate", *SMALL, "--out", str(out), *extra]) == 0
    return out


def test_simulate_writes_every_record(tmp_path):
    out = simulate(tmp_path)
    assert {p.name for p in out.iterdir()} >= {"config.toml", "metrics.json", "metrics.csv", "model.pt"}
    config = tomllib.loads((out / "config.toml").read_text())
    assert config["dataset"] == "digits" and config["num-rounds"] == 2 and config["num-clients"] == 4
    rounds = json.loads((out / "metrics.json").read_text())["rounds"]
    assert [r["round"] for r in rounds] == [0, 1, 2]
    last = rounds[-1]
    assert sorted(e["client_id"] for e in last["train"]) == ["0", "1", "2", "3"]
    assert {"loss", "accuracy", "precision_macro", "recall_macro", "f1_macro"} <= set(last["server"])
    assert last["server"]["accuracy"] > rounds[0]["server"]["accuracy"] + 0.2  # it learned
    assert all(e["metrics"]["num-examples"] > 0 for e in last["train"])
    with open(out / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert {r["source"] for r in rows} == {"server", "train", "evaluate"}
    assert sum(r["source"] == "train" for r in rows) == 8
    state = torch.load(out / "model.pt")
    assert all(torch.isfinite(v).all() for v in state.values())


def test_same_seed_same_model_other_seed_differs(tmp_path):
    a = torch.load(simulate(tmp_path, name="a") / "model.pt")
    b = torch.load(simulate(tmp_path, name="b") / "model.pt")
    c = torch.load(simulate(tmp_path, "--seed", "7", name="c") / "model.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_binary_task_reports_roc_auc(tmp_path):
    out = tmp_path / "bc"
    assert main(["simulate", "--dataset", "breast-cancer", "--model", "logreg", "--num-clients", "3", "--rounds", "1",
                 "--out", str(out)]) == 0
    server = json.loads((out / "metrics.json").read_text())["rounds"][-1]["server"]
    assert 0.5 < server["roc_auc"] <= 1.0


@pytest.mark.parametrize("strategy", ["fedavgm", "fedprox", "fedadam", "fedyogi", "fedadagrad", "krum",
                                      "trimmed-mean", "median"])
def test_every_strategy_runs(tmp_path, strategy):
    out = simulate(tmp_path, "--strategy", strategy, "--rounds", "1", "--fraction-train", "0.75")
    rounds = json.loads((out / "metrics.json").read_text())["rounds"]
    assert len(rounds[1]["sampled"]) == 3 and len(rounds[1]["train"]) == 3
    assert math.isfinite(rounds[1]["server"]["loss"])


def test_fraction_train_samples_the_same_clients_per_seed(tmp_path):
    a = json.loads((simulate(tmp_path, "--fraction-train", "0.5", name="a") / "metrics.json").read_text())
    b = json.loads((simulate(tmp_path, "--fraction-train", "0.5", name="b") / "metrics.json").read_text())
    assert [r["sampled"] for r in a["rounds"][1:]] == [r["sampled"] for r in b["rounds"][1:]]
    assert all(len(r["sampled"]) == 2 for r in a["rounds"][1:])


@pytest.mark.parametrize(
    ("flags", "fragment"),
    [
        (["--dataset", "mnist"], "unknown dataset 'mnist'; choose one of"),
        (["--model", "vgg"], "unknown model 'vgg'; choose one of"),
        (["--strategy", "fedsgd"], "unknown strategy 'fedsgd'; choose one of"),
        (["--partition", "dirichlet:-1"], "dirichlet"),
        (["--partition", "zipf"], "zipf"),
        (["--fraction-train", "0"], "fraction-train = 0.0 is out of range; it must be in (0, 1]"),
        (["--fraction-train", "1.5"], "fraction-train = 1.5 is out of range"),
        (["--num-clients", "5000"], "num-clients = 5000 is more than the"),
        (["--dataset", "fashion-mnist", "--data-dir", "/nonexistent"], "/nonexistent"),
        (["--set", "nonsense=1"], "unknown config key 'nonsense'"),
        (["--model", "lstm"], "model 'lstm' needs"),
    ],
)
def test_bad_input_is_one_line_before_training(tmp_path, capsys, flags, fragment):
    out = tmp_path / "bad"
    assert main(["simulate", *SMALL, "--out", str(out), *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert fragment in err and len(err.splitlines()) == 1 and "Traceback" not in err
    assert err.startswith("fedpriv simulate: error:")
    assert not (out / "metrics.json").exists()  # nothing started


def test_missing_and_corrupt_config_file(tmp_path, capsys):
    assert main(["simulate", "--config", str(tmp_path / "none.toml")]) == 2
    assert "does not exist" in capsys.readouterr().err
    bad = tmp_path / "bad.toml"
    bad.write_text("num-rounds = = 3")
    assert main(["simulate", "--config", str(bad)]) == 2
    assert "is not valid TOML" in capsys.readouterr().err


def test_config_file_is_overridden_by_flags(tmp_path):
    cfg = tmp_path / "run.toml"
    cfg.write_text('dataset = "digits"\nnum-rounds = 9\nlearning-rate = 0.2\n')
    rc = resolve(cfg, {"num-rounds": 3})
    assert rc["dataset"] == "digits" and rc["num-rounds"] == 3 and rc["learning-rate"] == 0.2


def test_pyproject_app_config_equals_the_defaults():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert project["tool"]["flwr"]["app"]["config"] == default_run_config()
    assert project["tool"]["flwr"]["app"]["components"] == {"serverapp": "server.app:app",
                                                            "clientapp": "client.app:app"}


def _poisoning_app(bad_client: str, how: str) -> ClientApp:
    """The real ClientApp, except that one client sends a broken update."""
    app = ClientApp()

    @app.query()
    def hello(msg, context):
        return client_app(msg, context)

    @app.evaluate()
    def evaluate(msg, context):
        return client_app(msg, context)

    @app.train()
    def train(msg, context):
        reply = client_app(msg, context)
        if str(context.node_config["partition-id"]) == bad_client:
            arrays = reply.content["arrays"]
            state = arrays.to_torch_state_dict()
            key = next(iter(state))
            if how == "nan":
                state[key][0] = float("nan")
            elif how == "shape":
                state[key] = state[key][:1]
            else:
                raise RuntimeError("disk on fire")
            reply.content["arrays"] = ArrayRecord(state)
        return reply

    return app


@pytest.mark.parametrize(("how", "reason"), [("nan", "NaN or Inf"), ("shape", "has shape"),
                                              ("crash", "disk on fire")])
def test_bad_update_is_dropped_and_recorded(tmp_path, how, reason):
    rc = resolve(None, {"dataset": "digits", "model": "mlp", "num-clients": 3, "num-rounds": 2,
                        "out-dir": str(tmp_path / "run")})
    nodes = [{"partition-id": i, "num-partitions": 3} for i in range(3)]
    run_inprocess(server_app, _poisoning_app("1", how), nodes, rc)
    rounds = json.loads((tmp_path / "run" / "metrics.json").read_text())["rounds"]
    for r in rounds[1:]:
        assert [d["client_id"] for d in r["dropped"]] == ["1"] and reason in r["dropped"][0]["reason"]
        assert sorted(e["client_id"] for e in r["train"]) == ["0", "2"]
        assert math.isfinite(r["server"]["loss"])
    state = torch.load(tmp_path / "run" / "model.pt")
    assert all(torch.isfinite(v).all() for v in state.values())


def test_context_state_persists_per_client(tmp_path):
    rc = resolve(None, {"dataset": "digits", "model": "logreg", "num-clients": 2, "num-rounds": 1,
                        "out-dir": str(tmp_path / "run")})
    grid = run_inprocess(server_app, client_app, [{"partition-id": i} for i in range(2)], rc)
    contexts = [grid.context_of(n) for n in grid.get_node_ids()]
    assert [c.node_config["partition-id"] for c in contexts] == [0, 1]
    assert contexts[0].state is not contexts[1].state  # one persistent Context per client


def test_ray_engine_matches_inprocess(tmp_path):
    """The same seed gives the same final weights on both engines (Ray costs ~15 s to start here).
    Float sums depend on torch's thread count: both engines get 2 (Ray's actors get their 2 cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # other tests may have left 1
    try:
        _check_ray_matches_inprocess(tmp_path)
    finally:
        torch.set_num_threads(threads)


def _check_ray_matches_inprocess(tmp_path):
    flags = ["--model", "logreg", "--num-clients", "2", "--rounds", "2"]
    a = torch.load(simulate(tmp_path, *flags, name="inprocess") / "model.pt")
    b = torch.load(simulate(tmp_path, *flags, "--engine", "ray", name="ray") / "model.pt")
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k].numpy(), b[k].numpy())


class _SlowGrid:
    """Replies appear on the pull after next; one destination never answers."""

    def __init__(self, silent: set[int]) -> None:
        self.silent, self.pulls, self.pending = silent, 0, {}

    def push_messages(self, messages):
        ids = []
        for i, msg in enumerate(messages):
            self.pending[f"m{i}"] = msg
            ids.append(f"m{i}")
        return ids

    def pull_messages(self, message_ids):
        from types import SimpleNamespace

        self.pulls += 1
        if self.pulls < 2:
            return []
        return [SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=mid)) for mid in message_ids
                if self.pending[mid] not in self.silent]


def test_exchange_polls_until_all_replies_or_timeout():
    from server.rounds import exchange

    grid = _SlowGrid(silent=set())
    replies = exchange(grid, [1, 2, 3], timeout=5.0, poll_seconds=0.01)
    assert sorted(r.metadata.reply_to_message_id for r in replies) == ["m0", "m1", "m2"] and grid.pulls == 2

    grid = _SlowGrid(silent={2})
    replies = exchange(grid, [1, 2, 3], timeout=0.2, poll_seconds=0.01)
    # m1 never answers: the loop stops at the timeout with the replies it has, pulling only what is missing.
    assert sorted({r.metadata.reply_to_message_id for r in replies}) == ["m0", "m2"] and grid.pulls > 3
    assert exchange(grid, [], timeout=1.0) == []


class _LoggingGrid:
    """Two nodes that answer every message on the next pull; logs pushes, pulls and the server's test."""

    def __init__(self, events: list[str]) -> None:
        self.events, self.pending = events, {}

    def get_node_ids(self):
        return [1, 2]

    def push_messages(self, messages):
        import uuid

        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = uuid.uuid4().hex
            self.pending[msg.metadata.message_id] = msg
            ids.append(msg.metadata.message_id)
            self.events.append(f"push {msg.metadata.message_type}")
        return ids

    def pull_messages(self, message_ids):
        from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

        replies = []
        for mid in message_ids:
            msg = self.pending.pop(mid)
            node = msg.metadata.dst_node_id
            kind = msg.metadata.message_type
            content = (RecordDict({"meta": ConfigRecord({"client-id": str(node)})}) if kind == "query" else
                       RecordDict({"metrics": MetricRecord({"loss": float(node), "num-examples": 1})}))
            reply = Message(content, reply_to=msg)
            reply.metadata.__dict__["_src_node_id"] = node
            replies.append(reply)
            self.events.append(f"reply {kind}")
        return replies


def test_the_server_tests_the_model_while_the_clients_evaluate_it(monkeypatch):
    """The evaluate messages go out first; the server's own test runs before their replies are pulled (so on a
    deployment the two overlap), and both results are recorded for the round."""
    from flwr.app import ArrayRecord
    from flwr.serverapp.strategy import FedAvg
    from flwr.supercore.task_identity import TaskIdentity

    from server.rounds import LoopSettings, run_rounds

    for name in ("_run_id", "_node_id", "_task_id"):  # messages are made as the ServerApp's own; undone after
        monkeypatch.setattr(TaskIdentity, name, 1)

    events: list[str] = []
    records = []

    def evaluate_fn(server_round, arrays):
        events.append("server test")
        return {"accuracy": 0.5}

    settings = LoopSettings(num_rounds=1, fraction_train=0.0, fraction_evaluate=1.0, seed=0, round_timeout=5.0)
    run_rounds(_LoggingGrid(events), FedAvg(fraction_evaluate=1.0), ArrayRecord([np.zeros(3, np.float32)]),
               settings, evaluate_fn, lambda record, arrays: records.append(record))
    evaluate = [e for e in events if not e.endswith("query")]
    assert evaluate == ["push evaluate", "push evaluate", "server test", "reply evaluate", "reply evaluate"]
    (record,) = records
    assert record.server == {"accuracy": 0.5}
    assert sorted(e["metrics"]["loss"] for e in record.evaluate) == [1.0, 2.0]
    assert set(record.phase_seconds) == {"train", "evaluate", "server"}
    assert 0 <= record.phase_seconds["server"] <= record.phase_seconds["evaluate"]
