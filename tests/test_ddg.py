"""The distributed discrete Gaussian option of distributed DP (privacy/ddg.py, secagg-noise = discrete-gaussian)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord

from common import ConfigError
from common.secagg_codec import decode_sum, encode_update
from common.secagg_config import SecAggConfig
from common.secagg_crypto import add_mod
from privacy.accounting import PrivacyError
from privacy.ddg import discrete_gaussian_rdp, sample_discrete_gaussian
from privacy.skellam import ORDERS, epsilon_curve, plan_skellam
from simulations.cli import main


def _exact_pmf(scale: float, reach: int) -> tuple[np.ndarray, np.ndarray]:
    k = np.arange(-reach, reach + 1)
    weights = np.exp(-(k.astype(float) ** 2) / (2 * scale**2))
    return k, weights / weights.sum()


def _variance_ok(draws: np.ndarray, scale: float) -> bool:
    """The check the tests below rely on: the draws' variance is the discrete Gaussian's own, within 3 %."""
    k, pmf = _exact_pmf(scale, int(40 * scale) + 10)
    return abs(draws.var() / float((pmf * k**2).sum()) - 1) < 0.03


@pytest.mark.parametrize("scale", [0.7, 2.0, 50.0, 1e4])
def test_sampler_draws_the_discrete_gaussian(scale: float) -> None:
    draws = sample_discrete_gaussian(scale, 200_000, np.random.default_rng(0))
    assert draws.dtype == np.int64
    assert abs(draws.mean()) < 5 * scale / math.sqrt(len(draws))
    assert _variance_ok(draws, scale)
    if scale <= 2:  # each probability mass near the centre, within 5 standard errors
        k, pmf = _exact_pmf(scale, 6)
        freq = np.array([(draws == v).mean() for v in k])
        assert np.all(np.abs(freq - pmf) < 5 * np.sqrt(pmf * (1 - pmf) / len(draws)) + 1e-4)


def test_a_sampler_with_too_little_noise_is_caught() -> None:
    """The variance check has teeth: a sampler that draws at a third of the scale fails it."""
    broken = sample_discrete_gaussian(50.0 / math.sqrt(10), 200_000, np.random.default_rng(1))
    assert not _variance_ok(broken, 50.0)


def _prop14(l2: float, l1: float, scale: float, n: int, d: int, alpha: int) -> float:
    """Proposition 14 of Kairouz, Liu, Steinke (2021), one order, written out separately from privacy/ddg.py."""
    tau = 0.0
    for k in range(1, n):
        tau += math.exp(-2 * math.pi**2 * scale**2 * k / (k + 1))
    tau *= 10
    a = l2 / (math.sqrt(n) * scale)
    b = l1 / (math.sqrt(n) * scale)
    return min(alpha * a * a / 2 + tau * d, alpha / 2 * (a * a + 2 * b * tau + tau * tau * d),
               alpha / 2 * (a + math.sqrt(d) * tau) ** 2)


@pytest.mark.parametrize(("scale", "n"), [(0.6, 5), (1.0, 3), (3.0, 20), (400.0, 10)])
def test_rdp_matches_an_independent_computation_of_the_published_bound(scale: float, n: int) -> None:
    l2, l1, d = 30.0, 400.0, 1024
    got = discrete_gaussian_rdp(l2, l1, scale, n, d, ORDERS)
    for i in (0, 10, 100, len(ORDERS) - 1):
        assert got[i] == pytest.approx(_prop14(l2, l1, scale, n, d, ORDERS[i]), rel=1e-12)
    gaussian = np.asarray(ORDERS) * l2**2 / (2 * n * scale**2)  # the continuous Gaussian's RDP
    assert np.all(got >= gaussian * (1 - 1e-12))
    if scale >= 3:  # tau is negligible: the sum behaves as a Gaussian
        np.testing.assert_allclose(got, gaussian, rtol=1e-9)


def test_scale_below_a_half_is_refused() -> None:
    with pytest.raises(PrivacyError, match="below 0.5"):
        discrete_gaussian_rdp(1.0, 1.0, 0.4, 3, 10, ORDERS)


def test_sum_of_encoded_updates_carries_the_calibrated_discrete_gaussian_noise() -> None:
    dim, n, clip, z = 3000, 6, 1.0, 0.8
    plan = plan_skellam(clip, z, 24, dim, threshold=4, max_clients=n, noise="discrete-gaussian")
    codec = {"codec": "skellam", "bits": plan.bits, "gamma": plan.gamma, "clip-norm": plan.clip_norm,
             "rotation-seed": 5, "padded-dim": plan.padded_dim, "lambda": plan.client_lambda,
             "norm-bound": plan.norm_bound, "noise": plan.noise}
    rng = np.random.default_rng(1)
    updates = [rng.normal(size=dim) * (0.3 if i else 5.0) for i in range(n)]
    total = np.zeros(plan.padded_dim, dtype=np.uint64)
    for i, u in enumerate(updates):
        old, new = ArrayRecord({"w": Array(np.zeros(dim, np.float32))}), ArrayRecord({"w": Array(u.astype(np.float32))})
        total = add_mod(total, encode_update(old, new, codec, seed=i), plan.bits)
    residual = decode_sum(total, codec, dim) - sum(u * min(1.0, clip / np.linalg.norm(u.astype(np.float32)))
                                                   for u in updates)
    # n clients each add variance (zC)^2 / threshold, as with Skellam noise
    assert residual.std() == pytest.approx(z * clip * math.sqrt(n / 4), rel=0.1)


def test_more_survivors_cost_less_and_the_noise_is_named(tmp_path) -> None:
    plan = plan_skellam(1.0, 1.0, 32, 1000, threshold=3, max_clients=10, noise="discrete-gaussian")
    few, many = epsilon_curve(plan, [3, 3], 1e-5), epsilon_curve(plan, [10, 10], 1e-5)
    assert many[-1] < few[-1] and few[0] < few[1]
    with pytest.raises(ConfigError, match="secagg-noise = 'laplace' is not one of skellam, discrete-gaussian"):
        SecAggConfig.from_run_config({"secagg-noise": "laplace"})
    out = tmp_path / "ddg"
    assert main(["simulate", "--dataset", "digits", "--model", "mlp", "--num-clients", "4", "--rounds", "2",
                 "--secagg", "--dp", "user", "--client-sampling", "fixed", "--user-noise-multiplier", "1.0",
                 "--secagg-noise", "discrete-gaussian", "--out", str(out)]) == 0
    record = json.loads((out / "privacy.json").read_text())
    ddp = record["secure_aggregation"]["distributed_dp"]
    assert ddp["noise"] == "discrete-gaussian" and "discrete Gaussian" in ddp["mechanism"]
    assert record["secure_aggregation"]["survivors_per_round"] == [4, 4]
    assert "discrete Gaussian noise" in (out / "report.md").read_text()
