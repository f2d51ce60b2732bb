"""User-level DP at the server: DP-FedAvg over clipped client updates with Gaussian noise on their mean.

Flower's `DifferentialPrivacyServerSideFixedClipping` clips each update and adds noise z*C/m to the
aggregate, which is right only for an unweighted mean over exactly m updates. fedpriv makes that hold:
- clients are averaged uniformly (FedAvg weighted by the `unit-weight` every client reports);
- the mean always has a fixed denominator D: missing, refused or dropped clients count as zero updates, so a
  dropout cannot shrink the denominator and inflate one client's influence beyond what the noise covers;
- fixed-size sampling (m of N): denominator m. Poisson sampling (rate q): the noisy mean is taken over all N
  (sum/N + noise z*C/N) and the update is scaled by 1/q, which gives exactly the fixed-denominator estimator
  sum/(qN) with noise z*C/(qN) (McMahan et al., 2018), the one the Poisson-amplified accountant assumes.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, Message
from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping, FedAvg

from privacy import DPConfig

WEIGHT_KEY = "unit-weight"
UserDPStrategy = DifferentialPrivacyServerSideFixedClipping


def denominator(dp: DPConfig, num_clients: int, fraction: float) -> int:
    if dp.client_sampling == "poisson":
        return num_clients
    return max(1, math.floor(num_clients * fraction + 1e-9))


def build_user_dp_strategy(dp: DPConfig, num_clients: int, fraction: float) -> UserDPStrategy:
    inner = FedAvg(fraction_train=1.0, fraction_evaluate=1.0, min_train_nodes=1, min_evaluate_nodes=1,
                   min_available_nodes=1, weighted_by_key=WEIGHT_KEY)
    return DifferentialPrivacyServerSideFixedClipping(
        inner, noise_multiplier=dp.user_noise_multiplier, clipping_norm=dp.user_clipping_norm,
        num_sampled_clients=denominator(dp, num_clients, fraction))


def aggregate_user_dp(strategy: UserDPStrategy, server_round: int, replies: list[Message], arrays: ArrayRecord,
                      dp: DPConfig, fraction: float, seed: int, canaries: Any = None) -> ArrayRecord:
    """One noisy DP-FedAvg step; returns the new global arrays (the old ones when nobody replied).

    Flower's wrapper returns w + mean_k(clipped deltas) + noise(z*C/D) for the k updates it got. With fewer
    than D, the fixed-denominator mean sum/D is that minus (1 - k/D) * mean_k(clipped deltas); the wrapper
    leaves each reply's clipped arrays in the reply, so that mean is computed from them.

    `canaries` (an audit run, server.audit.UserCanaries): canary clients' replies join the real ones, through
    the same clipping and noise; the auditor sees the released model, and their clipped contribution is
    then subtracted from the model the run keeps."""
    if not replies:
        return arrays
    n_real = len(replies)
    if canaries is not None:
        replies = [*replies, *canaries.replies(server_round, arrays, replies[0])]
    # Flower draws the noise from numpy's global generator; seeding it per round keeps runs reproducible.
    np.random.seed([seed, server_round])
    noisy, _ = strategy.aggregate_train(server_round, replies)
    if noisy is None:
        return arrays
    k, d = len(replies), strategy.num_sampled_clients
    old = arrays.to_numpy_ndarrays()
    new = noisy.to_numpy_ndarrays()
    clipped = [r.content["arrays"].to_numpy_ndarrays() for r in replies]
    scale = 1.0 / fraction if dp.client_sampling == "poisson" else 1.0
    out = {}
    for i, key in enumerate(arrays.keys()):
        mean_delta = sum(c[i] - old[i] for c in clipped) / k
        delta = (new[i] - old[i]) - (1.0 - k / d) * mean_delta
        out[key] = old[i] + scale * delta
    if canaries is not None:
        canaries.observe(server_round, old, [out[key] for key in arrays.keys()])
        for i, key in enumerate(arrays.keys()):
            out[key] = out[key] - scale * sum(c[i] - old[i] for c in clipped[n_real:]) / d
    return ArrayRecord({key: Array(np.asarray(v, dtype=old[i].dtype)) for i, (key, v) in enumerate(out.items())})
