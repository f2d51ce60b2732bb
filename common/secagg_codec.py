"""Updates <-> vectors in Z_{2^bits}: what a client masks, and how the server reads the unmasked sum.

Two codecs, chosen by the server and sent with the collect request:
- "plain" (SecAgg alone): each coordinate of the update (new - old weights) is clipped to +-clip-range,
  scaled and rounded stochastically (unbiased); the scale leaves room for every sampled client's value.
- "skellam" (distributed DP, privacy/skellam.py): the whole update is clipped to L2 norm C, rotated by a
  seeded randomized Hadamard transform (spreads it evenly over coordinates, so a few bits suffice), scaled by
  gamma, rounded conditionally (redrawn until its norm is within the bound the accounting assumes) and given
  its share of Skellam noise (or, with secagg-noise = discrete-gaussian, of discrete Gaussian noise of the same
  variance, privacy/ddg.py), drawn from OS entropy: the server must not be able to predict it.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Mapping
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord

from common.secagg_crypto import SecAggError, from_ring, quantize, to_ring
from privacy.ddg import sample_discrete_gaussian

MAX_ROUNDING_DRAWS = 1000


def flatten(arrays: ArrayRecord) -> np.ndarray:
    return np.concatenate([np.asarray(a, dtype=np.float64).ravel() for a in arrays.to_numpy_ndarrays()])


def unflatten(vector: np.ndarray, reference: ArrayRecord) -> ArrayRecord:
    out, pos = {}, 0
    for key, ref in zip(reference.keys(), reference.to_numpy_ndarrays(), strict=True):
        out[key] = Array(np.asarray(vector[pos:pos + ref.size].reshape(ref.shape), dtype=ref.dtype))
        pos += ref.size
    return ArrayRecord(out)


def fwht(x: np.ndarray) -> np.ndarray:
    """Orthonormal fast Walsh-Hadamard transform of a length-2^k vector (its own inverse)."""
    y = np.array(x, dtype=np.float64)
    n, h = len(y), 1
    while h < n:
        v = y.reshape(-1, 2, h)
        a, b = v[:, 0, :].copy(), v[:, 1, :]
        v[:, 0, :] += b
        v[:, 1, :] = a - b
        h *= 2
    return y / np.sqrt(n)


def _signs(seed: int, d: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 2, d) * 2.0 - 1.0


def rotate(x: np.ndarray, seed: int, d: int) -> np.ndarray:
    """H D x (orthonormal H), x zero-padded to d."""
    padded = np.zeros(d)
    padded[: len(x)] = x
    return fwht(padded * _signs(seed, d))


def unrotate(y: np.ndarray, seed: int, dim: int) -> np.ndarray:
    return (fwht(y) * _signs(seed, len(y)))[:dim]


def clip_l2(x: np.ndarray, norm: float) -> np.ndarray:
    length = float(np.linalg.norm(x))
    return x * min(1.0, norm / length) if length > 0 else x


def conditional_round(x: np.ndarray, bound: float, rng: np.random.Generator) -> np.ndarray:
    """Unbiased stochastic rounding, redrawn until the integer vector's L2 norm is within `bound`."""
    floor = np.floor(x)
    frac = x - floor
    for _ in range(MAX_ROUNDING_DRAWS):
        rounded = floor + (rng.random(x.shape) < frac)
        if float(np.linalg.norm(rounded)) <= bound:
            return rounded
    raise SecAggError(f"no rounding within norm {bound:.4g} in {MAX_ROUNDING_DRAWS} draws")


def encode_update(old: ArrayRecord, new: ArrayRecord, plan: Mapping[str, Any], seed: int) -> np.ndarray:
    """This client's update as a vector in Z_{2^bits}, per the server's plan."""
    delta = flatten(new) - flatten(old)
    bits = int(plan["bits"])
    rng = np.random.default_rng(seed)
    if plan["codec"] == "plain":
        return quantize(delta, float(plan["clip-range"]), float(plan["scale"]), bits, rng)
    if plan["codec"] != "skellam":
        raise SecAggError(f"unknown codec {plan['codec']!r}")
    d = int(plan["padded-dim"])
    scaled = rotate(clip_l2(delta, float(plan["clip-norm"])), int(plan["rotation-seed"]), d) * float(plan["gamma"])
    rounded = conditional_round(scaled, float(plan["norm-bound"]), rng)
    # The noise must be unknown to the server, which knows the run seed: it comes from the OS.
    noise_rng = np.random.default_rng(secrets.randbits(128))
    lam = float(plan["lambda"])
    if plan.get("noise", "skellam") == "discrete-gaussian":
        noise = sample_discrete_gaussian(math.sqrt(2 * lam), d, noise_rng)  # the same variance, 2*lambda
    else:
        noise = noise_rng.poisson(lam, d) - noise_rng.poisson(lam, d)
    return to_ring(rounded.astype(np.int64) + noise, bits)


def decode_sum(total: np.ndarray, plan: Mapping[str, Any], dim: int) -> np.ndarray:
    """The unmasked modular sum -> the sum of the clients' updates (noisy under the skellam codec)."""
    ints = from_ring(total, int(plan["bits"])).astype(np.float64)
    if plan["codec"] == "plain":
        return ints / float(plan["scale"])
    return unrotate(ints / float(plan["gamma"]), int(plan["rotation-seed"]), dim)


def encoded_length(plan: Mapping[str, Any], dim: int) -> int:
    return int(plan["padded-dim"]) if plan["codec"] == "skellam" else dim
