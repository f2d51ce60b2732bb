"""The audit's statistics on mechanisms whose epsilon is known exactly (privacy/audit.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import optimize, stats

from privacy.accounting import PrivacyError
from privacy.audit import (
    audit_stats,
    auroc,
    best_possible_bound,
    epsilon_for,
    epsilon_lower_bound,
    gaussian_epsilon,
    gaussian_epsilon_estimate,
    guess_plans,
    p_value,
    tpr_at_fpr,
    vacuity_problem,
)


def gaussian_mu(epsilon: float, delta: float) -> float:
    """Mean shift (in noise std) of the Gaussian mechanism that is exactly (epsilon, delta)-DP (Balle & Wang)."""
    def d(mu: float) -> float:
        return stats.norm.cdf(-epsilon / mu + mu / 2) - math.exp(epsilon) * stats.norm.cdf(-epsilon / mu - mu / 2)
    return optimize.brentq(lambda mu: d(mu) - delta, 1e-3, 50)


def randomized_response(epsilon: float, m: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    included = rng.random(m) < 0.5
    flip = rng.random(m) < 1 / (1 + math.exp(epsilon))
    return np.where(included ^ flip, 1.0, -1.0), included


def test_no_noise_reaches_the_best_possible_bound_for_m_and_r():
    rng = np.random.default_rng(0)
    m, delta = 1000, 1e-5
    included = rng.random(m) < 0.5
    scores = included.astype(float) + rng.normal(0, 1e-6, m)  # perfectly separated
    bound = epsilon_lower_bound(scores, included, delta, 0.95)
    assert bound.correct == bound.guesses
    plans = guess_plans(m)
    p = 0.05 / len(plans)
    # every plan whose guesses can all be right gives its all-correct value
    feasible = [t + b for t, b in plans if t <= included.sum() and b <= (~included).sum()]
    assert bound.epsilon == pytest.approx(max(epsilon_for(m, r, r, delta, p) for r in feasible), rel=1e-9)
    assert bound.epsilon <= best_possible_bound(m, delta, 0.95)
    # Without the 2*m*delta term, all r guesses right is a Binomial(r, q) tail q^r = p: the bound is logit(q)
    r = bound.guesses
    q = p ** (1 / r)
    assert epsilon_for(m, r, r, 0.0, p) == pytest.approx(math.log(q / (1 - q)), rel=1e-6)
    assert bound.epsilon < math.log(q / (1 - q))  # delta > 0 can only lower it


def test_null_scores_give_zero():
    rng = np.random.default_rng(1)
    m = 1000
    included = rng.random(m) < 0.5
    assert epsilon_lower_bound(np.zeros(m), included, 1e-5, 0.95).epsilon == 0.0  # every score tied
    zeros = [epsilon_lower_bound(rng.normal(size=m), rng.random(m) < 0.5, 1e-5, 0.95).epsilon for _ in range(10)]
    assert max(zeros) == 0.0


def test_gaussian_mechanism_bound_exceeds_true_epsilon_rarely_and_is_not_trivial():
    epsilon, delta, m = 2.0, 1e-5, 1000
    mu = gaussian_mu(epsilon, delta)
    bounds = []
    for seed in range(16):
        rng = np.random.default_rng(seed)
        included = rng.random(m) < 0.5
        bounds.append(epsilon_lower_bound(included * mu + rng.normal(size=m), included, delta, 0.95).epsilon)
    assert np.mean(np.array(bounds) > epsilon) <= 0.05
    assert np.median(bounds) > 0.2  # the attack does find the signal


def test_randomized_response_bound_is_close_to_epsilon_and_rarely_above_it():
    # Pure epsilon at delta 0 is the worst case for the bound: it must still hold at 95% confidence.
    epsilon, m = 1.0, 4000
    bounds = [epsilon_lower_bound(*randomized_response(epsilon, m, seed), 0.0, 0.95).epsilon for seed in range(100)]
    assert np.mean(np.array(bounds) > epsilon) <= 0.06  # 4 of these 100 seeds; a valid test allows 5%
    assert 0.85 * epsilon < np.median(bounds) <= epsilon


def test_a_broken_mechanism_is_caught():
    # Claims epsilon 1 but is randomized response at epsilon 3.
    bound = epsilon_lower_bound(*randomized_response(3.0, 2000, 0), 0.0, 0.95).epsilon
    assert bound > 2.0


def test_p_value_is_increasing_in_epsilon_and_has_the_delta_term():
    values = [p_value(1000, 100, 80, e, 1e-5) for e in (0.0, 0.5, 1.0, 2.0, 4.0)]
    assert values == sorted(values)
    assert p_value(1000, 100, 80, 1.0, 1e-3) > p_value(1000, 100, 80, 1.0, 0.0)


def test_gaussian_estimate_matches_the_known_gaussian_mechanism():
    assert gaussian_epsilon(gaussian_mu(2.0, 1e-5), 1.0, 0.0, 1.0, 1e-5) == pytest.approx(2.0, rel=1e-4)
    rng = np.random.default_rng(3)
    m, mu = 20000, gaussian_mu(3.0, 1e-5)
    included = rng.random(m) < 0.5
    est = gaussian_epsilon_estimate(included * mu + rng.normal(size=m), included, 1e-5)
    assert est == pytest.approx(3.0, rel=0.1)


def test_auroc_and_tpr():
    included = np.array([True] * 100 + [False] * 100)
    scores = np.r_[np.arange(100) + 100.0, np.arange(100.0)]
    assert auroc(scores, included) == 1.0 and tpr_at_fpr(scores, included) == 1.0
    assert auroc(-scores, included) == 0.0 and tpr_at_fpr(-scores, included) == 0.0
    assert auroc(np.zeros(200), included) == 0.5


def test_bad_input():
    with pytest.raises(PrivacyError, match="at least 10"):
        audit_stats(np.zeros(5), np.zeros(5, bool), 1e-5, 0.95)
    assert "at most --canaries" in vacuity_problem(1000, 1e-3, 0.95)
    assert vacuity_problem(1000, 1e-5, 0.95) is None
    with pytest.raises(PrivacyError, match=r"\(0, 1\)"):
        epsilon_lower_bound(np.zeros(20), np.zeros(20, bool), 1e-5, 1.5)
    with pytest.raises(PrivacyError, match="NaN"):
        audit_stats(np.full(20, np.nan), np.zeros(20, bool), 1e-5, 0.95)
