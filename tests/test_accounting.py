"""Accounting: composed epsilon, calibration, user-level curves and the budget calculator."""

from __future__ import annotations

import argparse
import json
import re
from itertools import pairwise

import dp_accounting
import pytest
from dp_accounting.pld import PLDAccountant
from dp_accounting.rdp import RdpAccountant

from privacy import (
    PrivacyError,
    Step,
    budget_answer,
    calibrate_noise,
    compute_epsilon,
    register,
    run_budget,
    user_level_epsilons,
)

DELTA = 1e-5
ROUND = Step(noise_multiplier=1.0, sample_rate=0.008, steps=125)


def _poisson(z: float, q: float) -> dp_accounting.DpEvent:
    return dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z))


# --- compute_epsilon ---------------------------------------------------------------------------------------

def test_rdp_matches_opacus_rdp_accountant_on_the_same_history():
    from opacus.accountants import RDPAccountant

    history = [ROUND, ROUND, Step(1.3, 0.01, 40), ROUND]
    opacus_acc = RDPAccountant()
    opacus_acc.history = [(s.noise_multiplier, s.sample_rate, s.steps) for s in history]
    ours = compute_epsilon(history, DELTA, "rdp")
    assert ours == pytest.approx(opacus_acc.get_epsilon(DELTA), abs=5e-5)
    assert ours > 1.2  # a real, non-trivial value, not 0 == 0


def test_rdp_and_pld_match_a_direct_dp_accounting_computation():
    history = [ROUND, Step(0.9, 0.02, 30), ROUND]
    rdp = RdpAccountant()
    pld = PLDAccountant(value_discretization_interval=1e-3)
    for s in history:  # one compose per entry, no merging of equal entries
        rdp.compose(dp_accounting.SelfComposedDpEvent(_poisson(s.noise_multiplier, s.sample_rate), s.steps))
        pld.compose(_poisson(s.noise_multiplier, s.sample_rate), s.steps)
    assert compute_epsilon(history, DELTA, "rdp") == pytest.approx(rdp.get_epsilon(DELTA), rel=1e-9)
    assert compute_epsilon(history, DELTA, "pld") == pytest.approx(pld.get_epsilon(DELTA), rel=1e-6)


def test_composed_epsilon_matches_platform_numbers_and_grows_with_rounds():
    per_round = compute_epsilon([ROUND], DELTA)
    composed = [compute_epsilon([ROUND] * r, DELTA) for r in (1, 2, 5, 20, 50)]
    assert per_round == pytest.approx(1.12, abs=0.005)
    assert composed[-1] == pytest.approx(4.02, abs=0.01)
    assert composed == sorted(composed) and len(set(composed)) == len(composed)
    # Reporting a fresh per-round value would understate 50 rounds by a factor of ~3.6.
    assert 3.3 < composed[-1] / per_round < 4.0


def test_tighter_accountants_agree_with_each_other_and_beat_rdp():
    history = [ROUND] * 3
    rdp, prv, pld = (compute_epsilon(history, DELTA, a) for a in ("rdp", "prv", "pld"))
    assert prv < rdp and pld < rdp
    assert prv == pytest.approx(pld, rel=0.03)


def test_empty_history_and_zero_steps_cost_nothing():
    assert compute_epsilon([], DELTA) == 0.0
    assert compute_epsilon([Step(1.0, 0.1, 0)], DELTA, "prv") == 0.0
    assert compute_epsilon([ROUND, Step(0.5, 0.5, 0)], DELTA) == compute_epsilon([ROUND], DELTA)


def test_fixed_size_sampling_uses_replace_one_with_doubled_sensitivity():
    # Without sampling (m = N) replace-one noise z*C against sensitivity 2C is the Gaussian at z/2.
    assert compute_epsilon([Step(2.0, 1.0, 10, "fixed", 50)], DELTA) == pytest.approx(
        compute_epsilon([Step(1.0, 1.0, 10)], DELTA), rel=1e-9)
    acc = RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
    gaussian = dp_accounting.GaussianDpEvent(0.75)  # z / 2 for z = 1.5
    acc.compose(dp_accounting.SampledWithoutReplacementDpEvent(100, 10, gaussian), 7)
    assert compute_epsilon([Step(1.5, 0.1, 7, "fixed", 100)], DELTA) == pytest.approx(acc.get_epsilon(DELTA))


@pytest.mark.parametrize("accountant", ["prv", "pld"])
def test_fixed_sampling_is_refused_by_prv_and_pld_with_the_way_out(accountant):
    with pytest.raises(PrivacyError, match="use accountant='rdp'"):
        compute_epsilon([Step(1.0, 0.1, 3, "fixed", 100)], DELTA, accountant)


def test_bad_accounting_inputs_are_named():
    with pytest.raises(PrivacyError, match="'moments'.*rdp, prv, pld"):
        compute_epsilon([ROUND], DELTA, "moments")
    with pytest.raises(PrivacyError, match=r"delta=1\.5"):
        compute_epsilon([ROUND], 1.5)
    with pytest.raises(PrivacyError, match="mixes poisson and fixed"):
        compute_epsilon([ROUND, Step(1.0, 0.1, 3, "fixed", 100)], DELTA)
    with pytest.raises(PrivacyError, match="not a Step"):
        compute_epsilon([(1.0, 0.01, 10)], DELTA)  # type: ignore[list-item]


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"noise_multiplier": 0.0, "sample_rate": 0.1, "steps": 1}, "noise_multiplier=0.0"),
    ({"noise_multiplier": -1, "sample_rate": 0.1, "steps": 1}, "noise_multiplier=-1"),
    ({"noise_multiplier": 1.0, "sample_rate": 0.0, "steps": 1}, r"sample_rate=0\.0.*\(0, 1\]"),
    ({"noise_multiplier": 1.0, "sample_rate": 1.5, "steps": 1}, r"sample_rate=1\.5"),
    ({"noise_multiplier": 1.0, "sample_rate": 0.1, "steps": -1}, "steps=-1"),
    ({"noise_multiplier": 1.0, "sample_rate": 0.1, "steps": 2.5}, "steps=2.5"),
    ({"noise_multiplier": 1.0, "sample_rate": 0.1, "steps": 1, "sampling": "shuffle"}, "'shuffle'"),
    ({"noise_multiplier": 1.0, "sample_rate": 0.1, "steps": 1, "sampling": "fixed"}, "needs population"),
    ({"noise_multiplier": 1.0, "sample_rate": 0.15, "steps": 1, "sampling": "fixed", "population": 10},
     "not a whole number"),
    ({"noise_multiplier": 1.0, "sample_rate": 0.1, "steps": 1, "population": 10}, "only meaningful"),
])
def test_step_validation(kwargs, match):
    with pytest.raises(PrivacyError, match=match):
        Step(**kwargs)


# --- calibrate_noise ---------------------------------------------------------------------------------------

def test_calibrated_noise_meets_the_target_and_is_minimal():
    z = calibrate_noise(3.0, DELTA, 0.008, 1250)
    assert compute_epsilon([Step(z, 0.008, 1250)], DELTA) <= 3.0
    assert compute_epsilon([Step(z * 0.99, 0.008, 1250)], DELTA) > 3.0
    assert 0.7 < z < 1.0


def test_calibration_accounts_for_the_prior_history():
    prior = [ROUND] * 10
    fresh = calibrate_noise(4.0, DELTA, 0.008, 125)
    z = calibrate_noise(4.0, DELTA, 0.008, 125, prior=prior)
    assert z > fresh  # budget already partly spent: more noise needed for the same total
    assert compute_epsilon([*prior, Step(z, 0.008, 125)], DELTA) <= 4.0
    assert compute_epsilon([*prior, Step(z * 0.99, 0.008, 125)], DELTA) > 4.0


def test_calibration_refuses_an_unreachable_target():
    prior = [ROUND] * 50  # epsilon ~4.02
    with pytest.raises(PrivacyError, match=r"unreachable.*prior history alone.*4\.02"):
        calibrate_noise(4.0, DELTA, 0.008, 125, prior=prior)
    with pytest.raises(PrivacyError, match="target_epsilon=-1"):
        calibrate_noise(-1, DELTA, 0.008, 125)


# --- user-level ------------------------------------------------------------------------------------------

def test_user_level_poisson_curve_is_monotone_amplified_and_consistent():
    curves = user_level_epsilons(1.0, "poisson", 20, DELTA, num_clients=100, sample_rate=0.1)
    rdp, pld = curves["rdp"], curves["pld"]
    assert len(rdp) == len(pld) == 20
    assert all(a < b for a, b in pairwise(rdp)) and all(a < b for a, b in pairwise(pld))
    assert rdp[-1] == pytest.approx(compute_epsilon([Step(1.0, 0.1, 20)], DELTA), rel=1e-9)
    assert pld[-1] == pytest.approx(compute_epsilon([Step(1.0, 0.1, 20)], DELTA, "pld"), rel=1e-6)
    no_amplification = compute_epsilon([Step(1.0, 1.0, 20)], DELTA)
    assert rdp[-1] < no_amplification / 2
    assert all(p <= r for p, r in zip(pld, rdp, strict=True))
    # clients_per_round alone gives the same Poisson rate m / N
    assert user_level_epsilons(1.0, "poisson", 20, DELTA, num_clients=100, clients_per_round=10)["rdp"] == rdp


def test_user_level_fixed_sampling_has_rdp_only():
    curves = user_level_epsilons(1.0, "fixed", 10, DELTA, num_clients=100, clients_per_round=10)
    assert curves["pld"] is None
    rdp = curves["rdp"]
    assert all(a < b for a, b in pairwise(rdp))
    assert rdp[-1] == pytest.approx(compute_epsilon([Step(1.0, 0.1, 10, "fixed", 100)], DELTA), rel=1e-9)
    assert rdp[-1] < compute_epsilon([Step(1.0, 1.0, 10, "fixed", 100)], DELTA)
    assert user_level_epsilons(1.0, "poisson", 0, DELTA, num_clients=5, sample_rate=0.2) == {"rdp": [],
                                                                                            "pld": []}


def test_user_level_needs_a_sampling_rate_or_size():
    with pytest.raises(PrivacyError, match="needs sample_rate"):
        user_level_epsilons(1.0, "poisson", 3, DELTA, num_clients=10)
    with pytest.raises(PrivacyError, match="needs clients_per_round"):
        user_level_epsilons(1.0, "fixed", 3, DELTA, num_clients=10)
    with pytest.raises(PrivacyError, match=r"clients_per_round=11.*\[1, num_clients=10\]"):
        user_level_epsilons(1.0, "fixed", 3, DELTA, num_clients=10, clients_per_round=11)


# --- budget calculator ------------------------------------------------------------------------------------

def _args(**kw):
    base = {"sample_rate": 0.008, "steps": 6250, "delta": DELTA, "noise_multiplier": None,
            "target_epsilon": None, "accountant": "rdp", "json": True}
    return argparse.Namespace(**{**base, **kw})


def test_budget_cli_json_reports_epsilon_for_a_noise_multiplier(capsys):
    assert run_budget(_args(noise_multiplier=1.0)) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) == {"epsilon", "delta", "noise_multiplier", "sample_rate", "steps", "accountant"}
    assert out["epsilon"] == pytest.approx(4.02, abs=0.01)
    assert (out["noise_multiplier"], out["sample_rate"], out["steps"], out["delta"], out["accountant"]) == (
        1.0, 0.008, 6250, DELTA, "rdp")


def test_budget_cli_json_solves_for_the_noise_multiplier(capsys):
    assert run_budget(_args(target_epsilon=4.02)) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["epsilon"] <= 4.02
    assert out["noise_multiplier"] == pytest.approx(1.0, rel=0.005)


def test_budget_cli_human_line_and_argparse_wiring(capsys):
    parser = argparse.ArgumentParser(prog="fedpriv")
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["budget", "--sample-rate", "0.008", "--steps", "125", "--delta", "1e-5",
                              "--noise-multiplier", "1.0"])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "epsilon = 1.123" in out and "125 steps" in out
    with pytest.raises(SystemExit) as exc:  # exactly one of the two is enforced by argparse too
        parser.parse_args(["budget", "--sample-rate", "0.1", "--steps", "1", "--delta", "1e-5"])
    assert exc.value.code == 2


@pytest.mark.parametrize(("kw", "match"), [
    ({"noise_multiplier": 1.0, "sample_rate": 2.0}, r"sample_rate=2\.0"),
    ({"noise_multiplier": 1.0, "delta": 0.0}, "delta=0.0"),
    ({}, "exactly one of noise_multiplier"),
    ({"noise_multiplier": 1.0, "target_epsilon": 3.0}, "exactly one of"),
])
def test_budget_cli_bad_values_exit_2_with_one_error_line(capsys, kw, match):
    assert run_budget(_args(**kw)) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fedpriv budget: error: ")
    assert re.search(match, lines[0])


def test_budget_answer_with_prv_on_a_short_plan():
    ans = budget_answer(sample_rate=0.01, steps=100, delta=DELTA, noise_multiplier=1.0, accountant="prv")
    assert ans["accountant"] == "prv"
    assert 0 < ans["epsilon"] < compute_epsilon([Step(1.0, 0.01, 100)], DELTA, "rdp")
