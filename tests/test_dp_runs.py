"""Differential privacy in whole runs: composed accounting checked against an independent accountant, the
budget guard, ledger restarts, user-level DP-FedAvg, local DP, resume, and the DP bad-input errors."""

from __future__ import annotations

import json
from pathlib import Path

import dp_accounting
import dp_accounting.rdp
import pytest
import torch
from opacus.accountants import RDPAccountant

from client.app import app as client_app
from client.guard import ledger_file
from privacy import PrivacyLedger, read_privacy_record, user_level_epsilons
from server.app import app as server_app
from simulations.cli import main
from simulations.inprocess import run_inprocess
from simulations.runconfig import resolve

BASE = ["--dataset", "digits", "--model", "mlp", "--num-clients", "3", "--local-epochs", "1", "--batch-size", "64"]


def run(tmp_path: Path, name: str, *flags: str) -> Path:
    out = tmp_path / name
    assert main(["simulate", *BASE, "--out", str(out), *flags]) == 0
    return out


def independent_epsilon(client: dict, delta: float) -> float:
    """Google's dp_accounting, composed here from the history the record lists (not through fedpriv's code)."""
    acc = dp_accounting.rdp.RdpAccountant()
    for steps in client["steps_per_round"]:
        event = dp_accounting.PoissonSampledDpEvent(client["sample_rate"],
                                                    dp_accounting.GaussianDpEvent(client["noise_multiplier"]))
        acc.compose(event, steps)
    return acc.get_epsilon(delta)


def opacus_epsilon(client: dict, delta: float) -> float:
    """Opacus' RDP accountant: another implementation, with its own grid of orders (agrees to ~0.5%)."""
    acc = RDPAccountant()
    acc.history = [(client["noise_multiplier"], client["sample_rate"], steps) for steps in client["steps_per_round"]]
    return acc.get_epsilon(delta)


def test_composed_epsilon_matches_an_independent_accountant_and_grows(tmp_path):
    out = run(tmp_path, "dp", "--rounds", "3", "--set", "dp=sample", "--set", "noise-multiplier=1.1",
              "--set", "delta=1e-3")
    record = read_privacy_record(out / "privacy.json")
    clients = record["sample_level"]["clients"]
    assert [c["client_id"] for c in clients] == ["0", "1", "2"]
    for c in clients:
        assert c["rounds"] == [1, 2, 3]
        assert c["grad_sample_mode"] == "bk"  # the run names the DP-SGD it used: book-keeping covers this model
        eps = c["epsilon_per_round"]
        assert eps[0] < eps[1] < eps[2]  # composed, not per round
        assert c["epsilon"] == pytest.approx(independent_epsilon(c, 1e-3), rel=1e-9)
        assert c["epsilon"] == pytest.approx(opacus_epsilon(c, 1e-3), rel=5e-3)
        first = {**c, "steps_per_round": c["steps_per_round"][:1]}
        assert eps[0] == pytest.approx(independent_epsilon(first, 1e-3), rel=1e-9)
    assert (out / "report.md").exists() and (out / "report.html").exists()
    report = (out / "report.md").read_text()
    assert "one example on one client" in report


def test_target_epsilon_is_met_by_the_whole_run(tmp_path):
    out = run(tmp_path, "target", "--rounds", "3", "--set", "dp=sample", "--set", "target-epsilon=4",
              "--set", "delta=1e-3")
    for c in read_privacy_record(out / "privacy.json")["sample_level"]["clients"]:
        assert 3.9 <= c["epsilon"] <= 4.0  # calibrated once for all rounds: tight, never over
        assert c["budget"] == {"epsilon": 4.0, "delta": 1e-3}


def test_budget_guard_refuses_and_the_server_goes_on(tmp_path):
    # noise 1.0, q = 1/7, 7 steps a round: epsilon 2.5, 3.3, 3.9, 4.4 after rounds 1-4; a budget of 3.5 stops round 3.
    out = run(tmp_path, "guard", "--rounds", "4", "--set", "dp=sample", "--set", "noise-multiplier=1.0",
              "--set", "delta=1e-3", "--set", "budget-epsilon=3.5")
    rounds = json.loads((out / "metrics.json").read_text())["rounds"]
    refused = [(r["round"], e["client_id"]) for r in rounds for e in r["refused"]]
    assert refused and all("refused" in e["reason"] for r in rounds for e in r["refused"])
    assert rounds[-1]["round"] == 4  # the run went on
    for c in read_privacy_record(out / "privacy.json")["sample_level"]["clients"]:
        assert c["epsilon"] <= 3.5 and c["rounds"] == [1, 2] and c["refused_rounds"] == [3, 4]
        assert c["refused_rounds"] == sorted(r for r, cid in refused if cid == c["client_id"])
        assert set(c["rounds"]).isdisjoint(c["refused_rounds"])


def _inprocess(tmp_path: Path, name: str, state_dir: Path, rounds: int) -> Path:
    rc = resolve(None, {"dataset": "digits", "model": "mlp", "num-clients": 2, "num-rounds": rounds,
                        "dp": "sample", "noise-multiplier": 1.0, "delta": 1e-3, "out-dir": str(tmp_path / name)})
    nodes = [{"partition-id": i, "state-dir": str(state_dir)} for i in range(2)]
    run_inprocess(server_app, client_app, nodes, rc)
    return tmp_path / name


def test_ledger_survives_a_client_restart(tmp_path):
    state = tmp_path / "state"
    _inprocess(tmp_path, "first", state, rounds=2)
    first = PrivacyLedger.load(ledger_file(state, "0"), owner="0")
    assert first.rounds() == [1, 2]
    # A new process: fresh Contexts, nothing in memory; only the ledger file remembers.
    second_dir = _inprocess(tmp_path, "second", state, rounds=1)
    ledger = PrivacyLedger.load(ledger_file(state, "0"), owner="0")
    assert len(ledger.entries) == 3 and ledger.epsilon(1e-3) > first.epsilon(1e-3)
    client = read_privacy_record(second_dir / "privacy.json")["sample_level"]["clients"][0]
    assert client["epsilon"] == pytest.approx(ledger.epsilon(1e-3), rel=1e-6)
    assert client["epsilon"] == pytest.approx(independent_epsilon(client, 1e-3), rel=1e-9)


def test_corrupt_ledger_stops_that_client_not_the_run(tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    ledger_file(state, "1").write_text("{not json")
    out = _inprocess(tmp_path, "run", state, rounds=1)
    r1 = json.loads((out / "metrics.json").read_text())["rounds"][1]
    assert [d["client_id"] for d in r1["dropped"]] == ["1"] and "unreadable" in r1["dropped"][0]["reason"]
    assert ledger_file(state, "1").read_text() == "{not json"  # nothing overwritten


@pytest.mark.parametrize("sampling", ["poisson", "fixed"])
def test_user_level_dp_is_accounted_with_sampling(tmp_path, sampling):
    out = run(tmp_path, sampling, "--num-clients", "4", "--rounds", "2", "--fraction-train", "0.5",
              "--set", "dp=user", "--set", f"client-sampling={sampling}", "--set", "user-noise-multiplier=1.2",
              "--set", "delta=1e-3")
    user = read_privacy_record(out / "privacy.json")["user_level"]
    expected = user_level_epsilons(1.2, sampling, 2, 1e-3, num_clients=4, sample_rate=0.5)
    assert user["epsilon_per_round"] == pytest.approx(expected["rdp"])
    assert user["client_sampling"] == sampling and user["num_clients"] == 4
    assert (user["epsilon_pld"] is None) == (sampling == "fixed")
    state = torch.load(out / "model.pt")
    assert all(torch.isfinite(v).all() for v in state.values())


def test_sample_and_user_level_together_report_both(tmp_path):
    out = run(tmp_path, "both", "--rounds", "1", "--set", "dp=sample,user", "--set", "noise-multiplier=1.0",
              "--set", "delta=1e-3")
    record = read_privacy_record(out / "privacy.json")
    assert record["sample_level"]["clients"] and record["user_level"]["epsilon"] > 0
    report = (out / "report.md").read_text()
    assert "one example on one client" in report and "all the data of one client" in report


def test_local_dp_states_per_round_and_composed(tmp_path):
    out = run(tmp_path, "local", "--rounds", "2", "--set", "dp=local", "--set", "local-epsilon=0.5")
    local = read_privacy_record(out / "privacy.json")["local"]
    assert local["epsilon_per_round"] == 0.5 and local["epsilon_composed"] == pytest.approx(1.0)


def test_resume_continues_as_if_never_stopped(tmp_path):
    flags = ["--strategy", "fedadam", "--set", "server-learning-rate=0.01"]
    full = run(tmp_path, "full", "--rounds", "3", *flags)
    part = run(tmp_path, "part", "--rounds", "2", *flags)
    assert main(["simulate", *BASE, "--out", str(part), "--rounds", "3", *flags,
                 "--set", f"resume-from={part}"]) == 0
    a, b = torch.load(full / "model.pt"), torch.load(part / "model.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["round"] for r in json.loads((part / "metrics.json").read_text())["rounds"]] == [0, 1, 2, 3]


@pytest.mark.parametrize(
    ("flags", "fragment"),
    [
        (["--set", "dp=sample"], "needs noise-multiplier or target-epsilon"),
        (["--set", "dp=sample", "--set", "target-epsilon=-1"], "target-epsilon"),
        (["--set", "dp=sample", "--set", "noise-multiplier=1", "--set", "delta=1.5"], "delta"),
        (["--set", "dp=sample", "--set", "noise-multiplier=-2"], "noise-multiplier"),
        (["--set", "dp=sample", "--set", "noise-multiplier=1", "--set", "max-grad-norm=0"], "max-grad-norm"),
        (["--set", "dp=sample", "--set", "noise-multiplier=1", "--strategy", "fedprox"], "FedProx"),
        (["--set", "dp=user", "--strategy", "krum"], "strategy 'krum' cannot honour it"),
        (["--set", "dp=magic"], "magic"),
    ],
)
def test_dp_bad_input_is_one_line(tmp_path, capsys, flags, fragment):
    assert main(["simulate", *BASE, "--out", str(tmp_path / "x"), *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert fragment in err and len(err.splitlines()) == 1 and err.startswith("fedpriv simulate: error:")


def test_delta_above_one_over_n_warns(tmp_path, capsys):
    run(tmp_path, "warn", "--rounds", "1", "--set", "dp=sample", "--set", "noise-multiplier=1",
        "--set", "delta=0.1")
    assert "warning: delta=0.1 is not below 1/n" in capsys.readouterr().err
