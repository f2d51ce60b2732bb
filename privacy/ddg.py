"""The distributed discrete Gaussian (Kairouz, Liu, Steinke, ICML 2021): sampling and accounting.

The option to Skellam noise (privacy/skellam.py) in distributed DP over secure aggregation: the same clipping,
rotation, scaling and conditional rounding, then each client adds discrete Gaussian noise N_Z(0, s^2) to every
integer coordinate. Unlike Skellam, a sum of discrete Gaussians is not exactly discrete Gaussian; the paper's
Proposition 14 bounds how far it is, through

    tau = 10 * sum_{k=1}^{n-1} exp(-2 pi^2 s^2 k / (k + 1))     (n summands of local scale s, in grid units)

and gives the sum of n clients' noise on a vector of L2 / L1 sensitivity D2 / D1 (grid units) the RDP

    eps(a) = min( a/2 * l2^2 + tau*d,  a/2 * (l2^2 + 2*l1*tau + tau^2*d),  a/2 * (l2 + sqrt(d)*tau)^2 )

with l2 = D2 / (sqrt(n) s), l1 = D1 / (sqrt(n) s) and d the dimension. It needs s >= 1/2.
"""

from __future__ import annotations

import math

import numpy as np

from privacy.accounting import PrivacyError

MIN_SCALE = 0.5  # the bound above holds for local scales s >= 1/2


def discrete_gaussian_rdp(l2: float, l1: float, scale: float, summands: int, dim: int,
                          orders: tuple[int, ...]) -> np.ndarray:
    """RDP at each order of the sum of `summands` clients' N_Z(0, scale^2) noise on a `dim`-dimensional integer
    vector of sensitivities (l2, l1), all in grid units."""
    if scale < MIN_SCALE:
        raise PrivacyError(f"discrete Gaussian scale {scale:.3g} is below {MIN_SCALE}: the distributed bound does "
                           "not hold; raise secagg-bits or the noise multiplier")
    if summands < 1:
        raise PrivacyError(f"a sum of {summands} clients' noise has no privacy")
    tau = 10.0 * sum(math.exp(-2.0 * math.pi**2 * scale**2 * k / (k + 1)) for k in range(1, summands))
    spread = math.sqrt(summands) * scale
    a2, a1 = l2 / spread, l1 / spread
    alpha = np.asarray(orders, dtype=np.float64)
    return np.minimum.reduce([alpha / 2 * a2**2 + tau * dim,
                              alpha / 2 * (a2**2 + 2 * a1 * tau + tau**2 * dim),
                              alpha / 2 * (a2 + math.sqrt(dim) * tau) ** 2])


def sample_discrete_gaussian(scale: float, size: int, rng: np.random.Generator) -> np.ndarray:
    """`size` draws of N_Z(0, scale^2): P(x) proportional to exp(-x^2 / (2 scale^2)) on the integers.

    Rejection from a discrete Laplace of parameter t = floor(scale) + 1 (Canonne, Kamath, Steinke, 2020,
    Algorithm 3), vectorised: draws that are rejected are drawn again. The acceptance test is computed in
    floating point, not in the exact arithmetic of the paper's sampler."""
    if not scale > 0:
        raise PrivacyError(f"discrete Gaussian scale {scale!r} must be > 0")
    t = math.floor(scale) + 1
    p = -math.expm1(-1.0 / t)  # success probability of the geometric halves of a discrete Laplace(t)
    out = np.empty(size, dtype=np.int64)
    todo = np.arange(size)
    while todo.size:
        n = todo.size
        y = rng.geometric(p, n).astype(np.int64) - rng.geometric(p, n).astype(np.int64)
        accept = rng.random(n) < np.exp(-((np.abs(y) - scale**2 / t) ** 2) / (2 * scale**2))
        out[todo[accept]] = y[accept]
        todo = todo[~accept]
    return out
