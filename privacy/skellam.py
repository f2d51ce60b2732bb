"""Distributed DP with the Skellam mechanism (Agarwal, Kairouz, Liu, NeurIPS 2021): calibration and accounting.

Each client clips its update to L2 norm C, rotates it (randomized Hadamard), scales it by gamma, rounds it to
integers (conditionally: redrawn until its norm is within `norm_bound`) and adds Skellam noise Sk(lam, lam)
= Poisson(lam) - Poisson(lam), variance 2*lam. Skellam noise is closed under sums, so n survivors' noise
sums to Sk(n*lam, n*lam). Each client's lam is calibrated so that `threshold` survivors already give the
central noise std z*gamma*C; more survivors only add noise. Accounting uses the n that actually survived.

RDP of the multi-dimensional Skellam mechanism (their Theorem 3.5), for Poisson mean mu of each side:
    eps(alpha) = alpha*D2^2/(4*mu) + min(((2*alpha - 1)*D2^2 + 6*D1)/(16*mu^2), 3*D1/(4*mu))
with D2, D1 the L2 and L1 sensitivities of the integer vector (D1 <= min(D2^2, sqrt(d)*D2) for integers).
Amplification by Poisson client sampling: the general upper bound for integer orders of Zhu & Wang (2019,
Theorem 8). dp_accounting converts RDP to (epsilon, delta).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from privacy.accounting import Deferred, PrivacyError, rdp_privacy_accountant
from privacy.ddg import discrete_gaussian_rdp

# Imported at first use: the ServerApp imports this module for every run, and scipy with dp_accounting would
# add 0.6 s to the start-up of the runs that use no secure aggregation.
special = Deferred("scipy.special")

ORDERS = tuple(range(2, 257))  # integer orders: the amplification bound needs them
BETA = math.exp(-0.5)  # conditional rounding: a draw is kept with probability >= 1 - BETA
COORDINATE_FAILURE = 1e-6  # chance a rotated coordinate exceeds the bound used to size gamma
NOISE_SIGMAS = 4.0  # headroom for the noise in the modulus, in standard deviations of the summed noise
# numpy's Poisson sampler matches Poisson(lam) closely up to lam ~ 1e12 and drifts (heavier tails, wrong
# variance) above ~1e13, so gamma is capped to keep each client's lam at most this.
MAX_LAMBDA = 1e11
MAX_INFLATION = 1.25  # rounding may grow the sensitivity by at most this factor, else more bits are needed


def padded_dim(dim: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(dim, 1))))


@dataclass(frozen=True)
class SkellamPlan:
    bits: int
    dim: int
    padded_dim: int
    clip_norm: float
    noise_multiplier: float
    threshold: int
    max_clients: int
    gamma: float  # scale: one unit of the integer grid is 1/gamma in the update's units
    norm_bound: float  # D2: the L2 norm every client's rounded, scaled vector is held to
    client_lambda: float  # each client's Poisson mean: its noise is Sk(client_lambda, client_lambda)
    # "skellam", or "discrete-gaussian" (privacy/ddg.py): N_Z(0, 2*client_lambda), the same variance
    noise: str = "skellam"

    @property
    def client_scale(self) -> float:
        """Each client's noise standard deviation in grid units (sqrt of the variance 2*lambda)."""
        return math.sqrt(2 * self.client_lambda)

    @property
    def l1_bound(self) -> float:
        return min(self.norm_bound**2, math.sqrt(self.padded_dim) * self.norm_bound)

    @property
    def inflation(self) -> float:
        """How much rounding grows the sensitivity over the clipped norm gamma*C (1.0 = not at all)."""
        return self.norm_bound / (self.gamma * self.clip_norm)

    def as_dict(self) -> dict:
        return {**asdict(self), "l1_bound": self.l1_bound, "inflation": self.inflation}


NOISES = ("skellam", "discrete-gaussian")


def plan_skellam(clip_norm: float, noise_multiplier: float, bits: int, dim: int, threshold: int,
                 max_clients: int, noise: str = "skellam") -> SkellamPlan:
    """Choose gamma so that `max_clients` rotated updates plus the noise fit in Z_{2^bits} with high
    probability (a wrap costs accuracy, never privacy: the modular sum is post-processing of the noisy sum)."""
    if not (clip_norm > 0 and noise_multiplier > 0):
        raise PrivacyError("distributed DP needs user-clipping-norm > 0 and user-noise-multiplier > 0")
    if noise not in NOISES:
        raise PrivacyError(f"secagg-noise = {noise!r} is not one of {', '.join(NOISES)}")
    if not 2 <= threshold <= max_clients:
        raise PrivacyError(f"secagg-threshold = {threshold} must be in 2..{max_clients} (the clients sampled)")
    d = padded_dim(dim)
    rho = math.sqrt(2 * math.log(2 * d / COORDINATE_FAILURE) / d)
    half = 2.0 ** (bits - 1)
    spread = clip_norm * (max_clients * rho + NOISE_SIGMAS * noise_multiplier * math.sqrt(max_clients / threshold))
    gamma = (half - max_clients) / spread
    if gamma <= 0:
        raise PrivacyError(f"secagg-bits = {bits} cannot hold {max_clients} clients' updates; raise secagg-bits")
    gamma = min(gamma, math.sqrt(2 * threshold * MAX_LAMBDA) / (noise_multiplier * clip_norm))
    g = gamma * clip_norm
    bound_sq = min((g + math.sqrt(d)) ** 2, g**2 + d / 4 + math.sqrt(2 * math.log(1 / BETA)) * (g + math.sqrt(d) / 2))
    norm_bound = math.sqrt(bound_sq)
    if norm_bound / g > MAX_INFLATION:
        raise PrivacyError(f"secagg-bits = {bits} is too few for {dim} parameters, {max_clients} clients and "
                           f"noise multiplier {noise_multiplier:g}: rounding would grow the sensitivity "
                           f"{norm_bound / g:.2f}x; raise secagg-bits (e.g. to {min(62, bits + 8)})")
    sigma = noise_multiplier * g  # the central noise std, in grid units, once `threshold` clients survive
    return SkellamPlan(bits, dim, d, clip_norm, noise_multiplier, threshold, max_clients, gamma, norm_bound,
                       sigma**2 / (2 * threshold), noise)


def skellam_rdp(l2: float, l1: float, mu: float, orders: tuple[int, ...] = ORDERS) -> np.ndarray:
    """The published RDP bound of Sk(mu, mu) noise per coordinate on a vector of sensitivities (l2, l1)."""
    a = np.asarray(orders, dtype=np.float64)
    return a * l2**2 / (4 * mu) + np.minimum(((2 * a - 1) * l2**2 + 6 * l1) / (16 * mu**2), 3 * l1 / (4 * mu))


def amplified_rdp(rdp: np.ndarray, q: float, orders: tuple[int, ...] = ORDERS) -> np.ndarray:
    """Poisson subsampling at rate q of a mechanism with RDP curve `rdp` (on consecutive integer orders from
    2): Zhu & Wang (2019), Theorem 8, general upper bound."""
    if q >= 1.0:
        return np.asarray(rdp, dtype=np.float64)
    if tuple(orders) != tuple(range(2, 2 + len(orders))):
        raise PrivacyError("amplified_rdp needs the consecutive integer orders 2, 3, ...")
    eps = np.concatenate([[0.0, 0.0], np.asarray(rdp, dtype=np.float64)])  # eps[j] = RDP at order j
    lq, l1q = math.log(q), math.log1p(-q)
    out = []
    for alpha in orders:
        j = np.arange(3, alpha + 1)
        terms = [(alpha - 1) * l1q + math.log(alpha * q - q + 1),
                 _log_comb(alpha, 2) + 2 * lq + (alpha - 2) * l1q + eps[2]]
        if len(j):
            tail = (math.log(3) + special.gammaln(alpha + 1) - special.gammaln(j + 1)
                    - special.gammaln(alpha - j + 1)
                    + j * lq + (alpha - j) * l1q + (j - 1) * eps[j])
            terms.append(float(special.logsumexp(tail)))
        out.append(float(special.logsumexp(terms)) / (alpha - 1))
    return np.asarray(out)


def _log_comb(n: int, k: int) -> float:
    return float(special.gammaln(n + 1) - special.gammaln(k + 1) - special.gammaln(n - k + 1))


def round_rdp(plan: SkellamPlan, survivors: int, sample_rate: float | None = None) -> np.ndarray:
    """RDP of one released round whose sum holds `survivors` clients' noise; amplified when sample_rate is given."""
    if plan.noise == "discrete-gaussian":
        rdp = discrete_gaussian_rdp(plan.norm_bound, plan.l1_bound, plan.client_scale, survivors, plan.padded_dim,
                                    ORDERS)
    else:
        rdp = skellam_rdp(plan.norm_bound, plan.l1_bound, survivors * plan.client_lambda)
    return amplified_rdp(rdp, sample_rate) if sample_rate is not None else rdp


def epsilon_curve(plan: SkellamPlan, survivors_per_round: list[int], delta: float,
                  sample_rate: float | None = None) -> list[float]:
    """Epsilon after each released round, composed (RDP adds up over rounds)."""
    total = np.zeros(len(ORDERS))
    curve = []
    per_n: dict[int, np.ndarray] = {}  # rounds with the same number of survivors cost the same
    for n in survivors_per_round:
        if n not in per_n:
            per_n[n] = round_rdp(plan, n, sample_rate)
        total = total + per_n[n]
        curve.append(float(rdp_privacy_accountant.compute_epsilon(ORDERS, total, delta)[0]))
    return curve
