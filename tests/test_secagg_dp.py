"""Distributed DP over SecAgg: the codec (rotation, rounding, Skellam noise) and the Skellam accounting."""

from __future__ import annotations

import math

import numpy as np
import pytest
from dp_accounting.rdp.rdp_privacy_accountant import compute_epsilon as dp_rdp_epsilon
from flwr.app import Array, ArrayRecord
from scipy import stats

from common.secagg_codec import decode_sum, encode_update, fwht, rotate, unrotate
from common.secagg_crypto import add_mod
from privacy.accounting import PrivacyError, Step, compute_epsilon
from privacy.skellam import ORDERS, amplified_rdp, epsilon_curve, plan_skellam, skellam_rdp


def arrays(vec: np.ndarray) -> ArrayRecord:
    return ArrayRecord({"w": Array(vec.astype(np.float32))})


def plan_dict(plan, seed=5):
    return {"codec": "skellam", "bits": plan.bits, "gamma": plan.gamma, "clip-norm": plan.clip_norm,
            "rotation-seed": seed, "padded-dim": plan.padded_dim, "lambda": plan.client_lambda,
            "norm-bound": plan.norm_bound}


def test_rotation_is_orthonormal_and_inverts():
    x = np.random.default_rng(0).normal(size=1000)
    y = rotate(x, 3, 1024)
    assert np.isclose(np.linalg.norm(y), np.linalg.norm(x)) and np.allclose(unrotate(y, 3, 1000), x)
    assert np.allclose(fwht(fwht(np.arange(8.0))), np.arange(8.0))
    spike = np.zeros(1000)
    spike[0] = 1.0
    assert np.max(np.abs(rotate(spike, 3, 1024))) < 0.05  # one large coordinate gets spread out


def test_sum_of_encoded_updates_decodes_to_the_clipped_sum_plus_calibrated_noise():
    dim, n, clip, z = 3000, 6, 1.0, 0.8
    plan = plan_skellam(clip, z, 24, dim, threshold=4, max_clients=n)
    rng = np.random.default_rng(1)
    old = np.zeros(dim)
    updates = [rng.normal(size=dim) * (0.3 if i else 5.0) for i in range(n)]  # client 0 must be clipped
    total = np.zeros(plan.padded_dim, dtype=np.uint64)
    for i, u in enumerate(updates):
        total = add_mod(total, encode_update(arrays(old), arrays(u), plan_dict(plan), seed=i), plan.bits)
    decoded = decode_sum(total, plan_dict(plan), dim)
    clipped = [u * min(1.0, clip / np.linalg.norm(u.astype(np.float32))) for u in updates]
    residual = decoded - sum(clipped)
    # Each coordinate: n clients each add variance (zC)^2 / threshold, so the sum carries (n/threshold)(zC)^2.
    expected_std = z * clip * math.sqrt(n / 4)
    assert residual.std() == pytest.approx(expected_std, rel=0.1)
    assert abs(residual.mean()) < 4 * expected_std / math.sqrt(dim)
    # A client that "forgot" its noise would leave a sum with too little: the check above would catch it.


def test_noise_free_encoding_would_be_caught():
    dim, plan = 2000, plan_skellam(1.0, 1.0, 24, 2000, threshold=2, max_clients=2)
    broken = {**plan_dict(plan), "lambda": 0.0}
    u = np.random.default_rng(2).normal(size=dim) * 0.01
    noisy = decode_sum(encode_update(arrays(np.zeros(dim)), arrays(u), plan_dict(plan), 0), plan_dict(plan), dim)
    quiet = decode_sum(encode_update(arrays(np.zeros(dim)), arrays(u), broken, 0), broken, dim)
    assert np.std(quiet - u) < 0.01 * np.std(noisy - u)


def test_too_few_bits_and_bad_threshold_are_refused():
    with pytest.raises(PrivacyError, match="raise secagg-bits"):
        plan_skellam(1.0, 1.0, 8, 400_000, threshold=5, max_clients=100)
    with pytest.raises(PrivacyError, match="secagg-threshold = 1"):
        plan_skellam(1.0, 1.0, 32, 1000, threshold=1, max_clients=10)


def _exact_skellam_renyi(alpha: float, shift: int, mu: float) -> float:
    """D_alpha(Sk(mu,mu) + shift || Sk(mu,mu)) summed over the support, straight from scipy's pmf."""
    k = np.arange(-int(60 * math.sqrt(mu)) - shift, int(60 * math.sqrt(mu)) + shift + 1)
    logp = stats.skellam.logpmf(k - shift, mu, mu)
    logq = stats.skellam.logpmf(k, mu, mu)
    ok = np.isfinite(logp) & np.isfinite(logq)
    return float(np.logaddexp.reduce(alpha * logp[ok] + (1 - alpha) * logq[ok])) / (alpha - 1)


@pytest.mark.parametrize("mu,shift", [(50.0, 3), (400.0, 10)])
def test_skellam_bound_covers_the_exact_divergence(mu, shift):
    """The published bound must dominate the exact Renyi divergence of a 1-D shift (D1 = |shift|, D2 = |shift|),
    and be tight to its correction terms: a bound with a wrong constant fails one of the two."""
    orders = (2, 4, 8, 16)
    bound = skellam_rdp(shift, shift, mu, orders)
    exact = np.array([_exact_skellam_renyi(a, shift, mu) for a in orders])
    assert np.all(bound >= exact)
    gaussian = np.array(orders) * shift**2 / (4 * mu)  # the variance-2mu Gaussian's divergence
    assert np.all(exact >= 0.9 * gaussian) and np.all(bound <= gaussian * 1.5)


def test_skellam_epsilon_matches_an_independent_computation():
    plan = plan_skellam(1.0, 1.2, 32, 10_000, threshold=8, max_clients=10)
    survivors = [10, 9, 8]
    ours = epsilon_curve(plan, survivors, 1e-5)
    # Independently: the paper's formula written out per order and round, summed, then dp_accounting.
    total = []
    d2, d1 = plan.norm_bound, min(plan.norm_bound**2, math.sqrt(plan.padded_dim) * plan.norm_bound)
    for a in ORDERS:
        s = 0.0
        for n in survivors:
            mu = n * plan.client_lambda
            s += a * d2**2 / (4 * mu) + min(((2 * a - 1) * d2**2 + 6 * d1) / (16 * mu**2), 3 * d1 / (4 * mu))
        total.append(s)
    assert ours[-1] == pytest.approx(dp_rdp_epsilon(ORDERS, total, 1e-5)[0], rel=1e-9)
    assert ours[0] < ours[1] < ours[2]
    # Close to the Gaussian mechanism of the same noise (sigma^2 = n/t of the calibrated one), never below it.
    gaussian = compute_epsilon([Step(1.2 * math.sqrt(10 / 8), 1.0, 1)], 1e-5)
    assert gaussian <= ours[0] <= gaussian * 1.05


def test_amplification_by_sampling_helps_and_vanishes_at_q_one():
    rdp = skellam_rdp(100.0, 100.0 * 30, 2e4)
    amp = amplified_rdp(rdp, 0.1)
    assert np.all(amp <= rdp + 1e-12) and np.all(amp > 0)
    assert np.array_equal(amplified_rdp(rdp, 1.0), rdp)
    # Sound against the tight Gaussian analysis of the same noise: the general bound is never below it.
    sigma = math.sqrt(2 * 2e4) / 100.0
    tight = compute_epsilon([Step(sigma, 0.1, 1)], 1e-5)
    ours = dp_rdp_epsilon(ORDERS, amp, 1e-5)[0]
    assert tight <= ours < dp_rdp_epsilon(ORDERS, rdp, 1e-5)[0]
