"""The canary audit end to end: canaries go through the real mechanism, an honest run is `consistent`, a run
whose noise is scaled down 10x behind the accountant's back is a `VIOLATION`, audits are reproducible, and
bad input is a one-line error that leaves the run folder as it was."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tomli_w
import torch
from torch import nn

from client.dpsgd import train_private
from common.config import TrainConfig
from privacy.canaries import GradientCanaries, gradient_canaries
from simulations.audit import run_audit
from simulations.cli import main
from simulations.runconfig import resolve

DIGITS = ["--dataset", "digits", "--model", "mlp", "--rounds", "3"]


@pytest.fixture(scope="module")
def sample_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("audit") / "sample"
    assert main(["simulate", *DIGITS, "--num-clients", "3", "--batch-size", "64", "--dp", "sample",
                 "--target-epsilon", "1", "--delta", "1e-4", "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def user_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("audit") / "user"
    # lr and local epochs pinned (not the recommended digits settings): the canary-removal check below is sized
    # for the float32 rounding of this run's means (~1e-3 in norm), which grows with the size of the updates.
    assert main(["simulate", *DIGITS, "--num-clients", "10", "--fraction-train", "0.5", "--batch-size", "32",
                 "--lr", "0.05", "--local-epochs", "1", "--dp", "user", "--user-noise-multiplier", "4",
                 "--delta", "1e-5", "--out", str(out)]) == 0
    return out


def weaker_dpsgd_noise(monkeypatch) -> None:
    """Fault injection: DP-SGD adds a tenth of the noise the accountant was told about, in both paths (Opacus
    and book-keeping, the default where it covers the model)."""
    import opacus.optimizers.optimizer as opt

    import client.bookkeeping as bk

    real = opt._generate_noise
    monkeypatch.setattr(opt, "_generate_noise", lambda std, reference, generator=None, secure_mode=False:
                        real(std * 0.1, reference, generator, secure_mode))
    real_bk = bk.gaussian_noise
    monkeypatch.setattr(bk, "gaussian_noise", lambda std, reference, generator: real_bk(std * 0.1, reference,
                                                                                          generator))


def weaker_user_noise(monkeypatch) -> None:
    """Fault injection: DP-FedAvg adds a tenth of its noise; privacy.json still records the configured one."""
    import server.userdp as userdp

    real = userdp.noise_std
    monkeypatch.setattr(userdp, "noise_std", lambda strategy: 0.1 * real(strategy))


@pytest.mark.parametrize("mode", ["hooks", "bk"])
def test_a_canary_row_is_clipped_and_scaled_like_a_real_example(mode):
    class OneCanary:
        def rows(self, step: int) -> list[tuple[str, int, float]]:
            return [("1.weight", 5, -10.0)] if step == 0 else []

    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    before = model[1].weight.detach().clone()
    x, y = np.zeros((64, 4), np.float32), np.zeros(64, np.int64)  # zero inputs: no data gradient on weights
    cfg = TrainConfig(model="mlp", optimizer="sgd", learning_rate=1.0, momentum=0.0, batch_size=64)
    result = train_private(model, x, y, cfg, noise_multiplier=1e-9, max_grad_norm=1.0, seed=0, canaries=OneCanary(),
                           grad_sample_mode=mode)
    assert result["grad-sample-mode"] == mode
    moved = (model[1].weight.detach() - before).view(-1)
    # clipped from 10 to C=1, divided by the expected batch size 64, one SGD step of lr 1
    assert moved[5].item() == pytest.approx(1.0 / 64, rel=1e-4)
    assert torch.count_nonzero(moved).item() == 1


def test_gradient_canaries_are_seeded_and_sampled_at_rate_q():
    sizes = [("a", 1000), ("b", 50)]
    specs = gradient_canaries(sizes, 400, seed=3)
    assert specs == gradient_canaries(sizes, 400, seed=3) and specs != gradient_canaries(sizes, 400, seed=4)
    assert len({(c.name, c.index) for c in specs}) == 400
    rows = GradientCanaries(specs, 0.1, 1.0, 3, 1, "0")
    counts = [len(rows.rows(step)) for step in range(200)]
    included = sum(c.included for c in specs)
    assert np.mean(counts) == pytest.approx(0.1 * included, rel=0.1)
    assert all(abs(v) == 10.0 for _, _, v in rows.rows(0))


def test_sample_level_honest_is_consistent_and_weaker_noise_is_a_violation(sample_run, monkeypatch):
    honest = run_audit(sample_run, canaries=500, seed=1)
    assert honest["verdict"] == "consistent" and honest["level"] == "sample"
    assert honest["grad_sample_mode"] == "bk"  # the canaries went through the run's own (book-keeping) DP-SGD
    assert honest["accountant_epsilon"] == pytest.approx(1.0, rel=0.05)
    assert honest["epsilon_lower_bound"] <= honest["accountant_epsilon"]
    report = (sample_run / "report.md").read_text()
    assert "## Empirical audit" in report and (sample_run / "report_audit_scores.png").is_file()
    assert "AUDIT VIOLATION" not in report

    weaker_dpsgd_noise(monkeypatch)
    broken = run_audit(sample_run, canaries=500, seed=1)
    assert broken["verdict"] == "VIOLATION"
    assert broken["epsilon_lower_bound"] > broken["accountant_epsilon"]
    assert broken["auroc"] > honest["auroc"]
    assert "AUDIT VIOLATION" in (sample_run / "report.md").read_text()
    assert "AUDIT VIOLATION" in (sample_run / "report.html").read_text()


def test_user_level_audit_is_reproducible_removes_canaries_and_catches_weaker_noise(user_run, monkeypatch):
    first = run_audit(user_run, canaries=300, seed=2)
    assert first["verdict"] == "consistent" and first["level"] == "user"
    scores = json.loads((user_run / "audit" / "canaries.json").read_text())["scores"]
    # The canaries' contribution is taken out of the kept model: it is the model of the run without them, up
    # to float32 rounding of Flower's mean over real and canary updates (~1e-3 in norm after 3 rounds here;
    # the canaries themselves add ~0.2 per sampled canary client, about 1 in norm a round).
    kept, plain = torch.load(user_run / "audit" / "model.pt"), torch.load(user_run / "model.pt")
    assert sum(float(((kept[k] - plain[k]) ** 2).sum()) for k in plain) ** 0.5 < 0.01
    again = run_audit(user_run, canaries=300, seed=2)
    assert json.loads((user_run / "audit" / "canaries.json").read_text())["scores"] == scores
    assert {k: v for k, v in again.items() if k != "seconds"} == {k: v for k, v in first.items() if k != "seconds"}

    weaker_user_noise(monkeypatch)
    broken = run_audit(user_run, canaries=300, seed=2)
    assert broken["verdict"] == "VIOLATION"
    assert main(["report", str(user_run)]) == 0
    assert "AUDIT VIOLATION" in (user_run / "report.md").read_text()


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _write_config(folder: Path, **overrides: object) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    config = resolve(None, {"dataset": "digits", "model": "mlp", "out-dir": str(folder), **overrides})
    (folder / "config.toml").write_bytes(tomli_w.dumps(config).encode())


@pytest.mark.parametrize(("setup", "args", "message"), [
    ("nodp", [], "nothing to audit"),
    ("noprivacy", [], "does not exist"),
    ("corrupt", [], "not readable JSON"),
    ("dp", ["--canaries", "5"], "at least 10"),
    ("dp", ["--canaries", "100000"], "vacuous"),
    ("dp", ["--confidence", "1.5"], "(0, 1)"),
    ("noconfig", [], "no config.toml"),
])
def test_bad_input_is_one_line_and_leaves_the_run_folder_alone(tmp_path, capsys, setup, args, message):
    run = tmp_path / "run"
    if setup == "nodp":
        _write_config(run)
    elif setup == "noconfig":
        run.mkdir()
        (run / "privacy.json").write_text("{}")
    else:
        _write_config(run, dp="sample", **{"target-epsilon": 1.0, "delta": 1e-4})
        if setup == "corrupt":
            (run / "privacy.json").write_text("{not json")
        elif setup == "dp":
            (run / "privacy.json").write_text(json.dumps({"schema_version": 1}))
    before = _snapshot(run)
    assert main(["audit", str(run), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert _snapshot(run) == before


def weaker_local_noise(monkeypatch) -> None:
    """Fault injection: LocalDpMod adds a tenth of the noise its (epsilon, delta) calls for."""
    import flwr.clientapp.mod.localdp_mod as ld

    real = ld.add_gaussian_noise_inplace
    monkeypatch.setattr(ld, "add_gaussian_noise_inplace", lambda arrays, std: real(arrays, 0.1 * std))


def test_local_dp_audit_is_consistent_and_catches_weaker_noise(tmp_path, monkeypatch):
    out = tmp_path / "local"
    assert main(["simulate", "--dataset", "digits", "--model", "logreg", "--rounds", "2", "--num-clients", "2",
                 "--dp", "local", "--set", "local-epsilon=0.5", "--delta", "1e-6", "--out", str(out)]) == 0
    honest = run_audit(out, canaries=500, seed=0)
    assert honest["level"] == "local" and honest["verdict"] == "consistent"
    assert honest["accountant_epsilon"] == pytest.approx(1.0) and honest["delta"] == pytest.approx(2e-6)
    weaker_local_noise(monkeypatch)
    broken = run_audit(out, canaries=500, seed=0)
    assert broken["verdict"] == "VIOLATION", broken
