"""The in-process engine without the work that is not work: metrics from a confusion matrix, records appended
per round, models and decoded weights reused per process, no client evaluation when asked, lazy imports."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord
from sklearn import metrics as skm

from client.reuse import decoded_state, load_global, reusable_model, reusable_optimizer
from common.config import TrainConfig
from common.partitions import partition_indices
from common.training import classification_metrics, train
from models import TaskSpec, build_model
from server import records as records_module
from server.records import RunRecords, read_rounds
from simulations.cli import main

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--dataset", "digits", "--model", "mlp", "--num-clients", "6", "--rounds", "2"]


def _sklearn_metrics(y: np.ndarray, logits: torch.Tensor) -> dict[str, float]:
    pred = logits.argmax(1).numpy()
    p, r, f, _ = skm.precision_recall_fscore_support(y, pred, average="macro", zero_division=0)
    out = {"accuracy": skm.accuracy_score(y, pred), "precision_macro": p, "recall_macro": r, "f1_macro": f,
           "loss": float(torch.nn.functional.cross_entropy(logits, torch.from_numpy(y)))}
    if logits.shape[1] == 2:
        scores = torch.softmax(logits, 1)[:, 1].numpy()
        out["roc_auc"] = skm.roc_auc_score(y, scores) if len(np.unique(y)) == 2 else float("nan")
    return out


def test_confusion_matrix_metrics_equal_sklearn_on_random_data():
    rng = np.random.default_rng(0)
    for trial in range(200):
        classes = int(rng.integers(2, 12))
        n = int(rng.integers(1, 40))
        # Every third trial leaves classes out of the labels, so the macro average's class set matters.
        y = rng.integers(0, classes if trial % 3 else max(2, classes // 2), n).astype(np.int64)
        # Rounded logits give ties in the AUC scores.
        logits = torch.tensor(rng.normal(size=(n, classes)).round(1), dtype=torch.float32)
        ours, ref = classification_metrics(y, logits), _sklearn_metrics(y, logits)
        assert set(ours) == set(ref)
        for key, value in ref.items():
            if np.isnan(value):
                assert np.isnan(ours[key]), key
            else:
                assert ours[key] == pytest.approx(value, abs=1e-12), (trial, key)


def test_iid_partition_equals_flowers_iid_partitioner():
    from flwr_datasets.partitioner import IidPartitioner

    from common.partitions import _read_idx, _table

    y = np.random.default_rng(1).integers(0, 10, 1003)
    for n, seed in [(7, 3), (100, 42)]:
        order = np.random.default_rng(seed).permutation(len(y))
        partitioner = IidPartitioner(num_partitions=n)
        partitioner.dataset = _table({"label": y[order], "idx": order})
        expected = [np.sort(p) for p in _read_idx(partitioner, n)]
        got = partition_indices(y, "iid", n, seed)
        assert len(got) == n and all(np.array_equal(a, b) for a, b in zip(expected, got, strict=True))


def _round(r: int, extra_metric: bool = False) -> dict:
    metrics = {"loss": 0.5, "accuracy": 0.5, **({"new": 1.0} if extra_metric else {})}
    return {"round": r, "server": {"accuracy": 0.1 * r, "loss": float("nan")},
            "train": [{"client_id": "0", "metrics": {"train_loss": 1.0}}],
            "evaluate": [{"client_id": "1", "metrics": metrics}]}


def test_records_are_appended_per_round_and_readable(tmp_path, monkeypatch):
    monkeypatch.setattr(records_module, "JSON_MAX_SHARE", 1e-9)  # after the first write, never during the run
    records = RunRecords(tmp_path, {"seed": 1})
    for r in range(3):
        records.add_round(_round(r))
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["round"] for line in lines] == [0, 1, 2]
    assert json.loads(lines[0])["server"]["loss"] is None  # NaN is written as null
    # metrics.json was written once (round 0) and is brought up to date by flush, as at the end of a run.
    assert [r["round"] for r in json.loads((tmp_path / "metrics.json").read_text())["rounds"]] == [0]
    records.flush()
    assert [r["round"] for r in json.loads((tmp_path / "metrics.json").read_text())["rounds"]] == [0, 1, 2]
    # A round with a metric no earlier row had widens the CSV: every row keeps its values under its column.
    records.add_round(_round(3, extra_metric=True))
    with open(tmp_path / "metrics.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 4 * 3 and rows[-1]["new"] == "1.0" and rows[1]["train_loss"] == "1.0"
    assert rows[0]["source"] == "server" and rows[0]["accuracy"] == "0.0"
    # A resumed run that repeats round 3 keeps one record of it (the later one), in every file.
    again = RunRecords(tmp_path, {"seed": 1}, keep_existing=True)
    again.add_round({**_round(3), "server": {"accuracy": 0.99}})
    again.flush()
    rounds = read_rounds(tmp_path)
    assert [r["round"] for r in rounds] == [0, 1, 2, 3] and rounds[-1]["server"]["accuracy"] == 0.99
    assert json.loads((tmp_path / "metrics.json").read_text())["rounds"] == rounds
    with open(tmp_path / "metrics.csv") as fh:
        assert sum(row["source"] == "server" for row in csv.DictReader(fh)) == 4


def test_fraction_evaluate_zero_and_the_evaluation_cap(tmp_path):
    out = tmp_path / "none"
    assert main(["simulate", *SMALL, "--out", str(out), "--fraction-evaluate", "0"]) == 0
    rounds = json.loads((out / "metrics.json").read_text())["rounds"]
    assert [r["round"] for r in rounds] == [0, 1, 2]
    assert all(r["evaluate"] == [] for r in rounds) and all(len(r["train"]) == 6 for r in rounds[1:])
    # The server's own evaluation still runs, and the model learned (chance is 0.1).
    assert {"accuracy", "f1_macro"} <= set(rounds[-1]["server"]) and rounds[-1]["server"]["accuracy"] > 0.15
    capped = tmp_path / "capped"
    assert main(["simulate", *SMALL, "--out", str(capped), "--max-evaluate-clients", "2"]) == 0
    rounds = json.loads((capped / "metrics.json").read_text())["rounds"]
    assert [len(r["evaluate"]) for r in rounds[1:]] == [2, 2]


@pytest.mark.parametrize(("flags", "fragment"), [
    (["--fraction-evaluate", "-0.1"], "fraction-evaluate = -0.1 is out of range"),
    (["--max-evaluate-clients", "-1"], "max-evaluate-clients = -1 must be >= 0"),
])
def test_bad_evaluation_settings_are_one_line_errors(tmp_path, capsys, flags, fragment):
    assert main(["simulate", *SMALL, "--out", str(tmp_path / "r"), *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert fragment in err and len(err.splitlines()) == 1


def _train_once(model: torch.nn.Module, optimizer, seed: int, x, y, cfg) -> dict[str, torch.Tensor]:
    train(model, x, y, cfg, seed=seed, optimizer=optimizer)
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_reused_model_and_optimizer_train_bit_for_bit_like_fresh_ones():
    spec = TaskSpec(input_shape=(64,), num_classes=10)
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(50, 64)).astype(np.float32), rng.integers(0, 10, 50)
    start = ArrayRecord(build_model("mlp", spec, seed=1).state_dict())
    for optimizer in ("sgd", "adam"):
        cfg = TrainConfig(model="mlp", optimizer=optimizer, learning_rate=0.05, momentum=0.9, local_epochs=2,
                          batch_size=16)
        fresh = _train_once(load_global(build_model("mlp", spec), start), None, 7, x, y, cfg)
        model = reusable_model("mlp", spec)
        # Another client trains first: it leaves weights, gradients and optimizer state behind.
        other = ArrayRecord(build_model("mlp", spec, seed=2).state_dict())
        _train_once(load_global(model, other), reusable_optimizer(model, cfg), 3, x[::-1].copy(), y, cfg)
        reused = _train_once(load_global(model, start), reusable_optimizer(model, cfg), 7, x, y, cfg)
        assert reusable_model("mlp", spec) is model
        assert all(torch.equal(fresh[k], reused[k]) for k in fresh), optimizer


def test_decoded_weights_follow_a_new_record():
    spec = TaskSpec(input_shape=(64,), num_classes=10)
    a = ArrayRecord(build_model("mlp", spec, seed=1).state_dict())
    b = ArrayRecord(build_model("mlp", spec, seed=2).state_dict())
    first = decoded_state(a)
    assert decoded_state(a)["1.weight"] is first["1.weight"]  # the same record is decoded once
    second = decoded_state(b)  # a stale cache would hand back a's weights here
    assert all(torch.equal(second[k], torch.from_numpy(b[k].numpy())) for k in b)
    assert not torch.equal(second["1.weight"], first["1.weight"])


def test_read_only_load_skips_only_while_the_model_still_holds_the_weights():
    spec = TaskSpec(input_shape=(64,), num_classes=10)
    a = ArrayRecord(build_model("mlp", spec, seed=1).state_dict())
    model = reusable_model("mlp", spec)
    load_global(model, a, read_only=True)
    want = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():  # any in-place write, as an optimizer step is, must make the next load copy again
        next(model.parameters()).add_(1.0)
    load_global(model, a, read_only=True)
    assert all(torch.equal(want[k], v) for k, v in model.state_dict().items())
    weights = next(model.parameters())
    version = weights._version
    load_global(model, a, read_only=True)  # unchanged since: nothing copied
    assert weights._version == version
    # A wrongly shaped update is refused by load_state_dict's own message, not broadcast by copy_.
    bad = ArrayRecord({**model.state_dict(), "1.weight": torch.zeros(1)})
    with pytest.raises(RuntimeError, match="size mismatch"):
        load_global(model, bad)


def _modules_after(code: str) -> set[str]:
    probe = f"{code}\nimport sys\nprint(' '.join(sorted(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return set(done.stdout.split())


def test_help_and_a_run_without_dp_import_no_opacus_ray_or_matplotlib(tmp_path):
    # Each of these costs a start-up 0.2-2 s: Opacus, Ray, matplotlib; dp_accounting with scipy (DP runs and
    # secure aggregation only); Flower's HTTP grid with FastAPI (deployments only).
    heavy = {"opacus", "ray", "matplotlib", "dp_accounting", "flwr.superlink.grid.http_grid", "fastapi"}
    loaded = _modules_after("from simulations.cli import build_parser\nbuild_parser().format_help()")
    assert not (heavy | {"scipy"}) & loaded and "torch" not in loaded
    loaded = _modules_after(
        "from simulations.cli import main\n"
        f"assert main(['simulate', *{SMALL!r}, '--rounds', '1', '--out', {str(tmp_path / 'r')!r}]) == 0")
    assert not heavy & loaded and "torch" in loaded


def test_client_directory_follows_a_reconnected_client():
    from flwr.app import ConfigRecord, Context, Message, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.supercore.task_identity import TaskIdentity

    from server.rounds import ClientDirectory
    from simulations.inprocess import InProcessGrid

    app = ClientApp()

    @app.query()
    def hello(msg: Message, context: Context) -> Message:
        return Message(RecordDict({"meta": ConfigRecord({"client-id": context.node_config["cid"]})}), reply_to=msg)

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
    grid = InProcessGrid(app, [{"cid": "a"}, {"cid": "b"}], {}, run_id=1)
    directory = ClientDirectory()
    directory.refresh(grid, timeout=10)
    assert directory.clients() == ["a", "b"] and directory.node_of("b") == 3
    # "b" comes back under node 4 (node 3 is gone); "c" joins as node 5.
    del grid._contexts[3]
    for node, cid in ((4, "b"), (5, "c")):
        grid._contexts[node] = Context(run_id=1, node_id=node, node_config={"cid": cid}, state=RecordDict(),
                                       run_config={})
    directory.refresh(grid, timeout=10)
    assert directory.by_node == {2: "a", 4: "b", 5: "c"}
    assert [directory.node_of(c) for c in ("a", "b", "c")] == [2, 4, 5]


def test_fast_array_codec_writes_np_save_bytes_and_reads_them_back() -> None:
    """common/arrays.py: the bytes are np.save's exactly (every reader decodes them as before), and reading
    takes the Array's own dtype and shape, with np.load deciding anything unusual."""
    import numpy as np
    import torch
    from flwr.app import Array

    from common.arrays import array_record, as_numpy, record_bytes, to_array

    cases = [np.random.default_rng(0).random((3, 4)).astype(np.float32), np.arange(10), np.zeros((0, 5), np.float32),
             np.array(3.0), np.random.default_rng(1).random((4, 3)).T, np.array([True, False]),
             np.arange(6, dtype=np.int16).reshape(2, 3)]
    for values in cases:
        flower = Array(values if values.flags.c_contiguous else np.ascontiguousarray(values))
        ours = to_array(values)
        assert ours.data == flower.data
        assert (ours.dtype, tuple(ours.shape), ours.stype) == (flower.dtype, tuple(flower.shape), flower.stype)
        back = as_numpy(flower)
        assert back.dtype == values.dtype and back.shape == values.shape and np.array_equal(back, values)
    fortran = np.asfortranarray(np.arange(6.0).reshape(2, 3))
    assert np.array_equal(as_numpy(Array(fortran)), fortran)  # np.load decides a Fortran-ordered .npy
    state = torch.nn.Linear(5, 3).state_dict()
    record = array_record(state)
    assert list(record.keys()) == list(state.keys())
    assert record_bytes(record) == sum(t.numel() * 4 for t in state.values())
    assert all(torch.equal(torch.from_numpy(as_numpy(record[k]).copy()), t) for k, t in state.items())


def test_the_command_skips_teardown_but_keeps_its_output_exit_code_and_exit_handlers(tmp_path):
    """simulations.cli.run ends the process with os._exit after main: what it printed, the files it wrote, its
    exit code and the exit handlers (here one that writes a file) must all survive that."""
    out, marker = tmp_path / "r", tmp_path / "atexit-ran"
    probe = ("import atexit, pathlib, sys\n"
             f"atexit.register(pathlib.Path({str(marker)!r}).write_text, 'yes')\n"
             "from simulations.cli import run\n"
             f"sys.argv = ['fedpriv', 'simulate', *{SMALL!r}, '--rounds', '1', '--out', {str(out)!r}]\n"
             "run()\n")
    done = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"records written to {out}" in done.stdout and marker.read_text() == "yes"
    assert (out / "metrics.json").stat().st_size > 0 and (out / "model.pt").stat().st_size > 0
    bad = subprocess.run([sys.executable, "-m", "simulations.cli", "simulate", "--rounds", "0"], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "fedpriv simulate: error:" in bad.stderr and "rounds" in bad.stderr
    # under a profiler the command exits the ordinary way, so the profile is written
    profiled = subprocess.run([sys.executable, "-m", "cProfile", "-o", str(tmp_path / "p.prof"), "-m",
                               "simulations.cli", "simulate", "--rounds", "0"], cwd=ROOT, capture_output=True,
                              text=True, timeout=300)
    assert profiled.returncode == 0 and (tmp_path / "p.prof").stat().st_size > 0, profiled.stderr[-2000:]
