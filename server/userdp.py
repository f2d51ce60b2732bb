"""User-level DP at the server: DP-FedAvg over clipped client updates with Gaussian noise on their mean.

The mechanism is that of Flower's `DifferentialPrivacyServerSideFixedClipping` (each update clipped, noise
z*C/m on the aggregate), computed here by `ClippedSum`; the Flower object built below holds the
settings and configures the rounds. Its noise is right only for an unweighted mean over exactly m updates,
and fedpriv makes that hold:
- clients are summed uniformly, whatever weight they report;
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
from flwr.app import ArrayRecord, Message
from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping, FedAvg

from common.arrays import array_record, as_numpy
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


class ClippedSum:
    """One noisy DP-FedAvg step, fed one reply at a time (server/aggregation.py); `result` gives the new global
    arrays (the old ones when nobody replied).

    The mechanism of Flower's `DifferentialPrivacyServerSideFixedClipping` (`strategy` holds its settings),
    computed here in one pass over each reply's arrays, decoded once and not re-encoded: each update
    w_k - w is clipped to L2 norm C over all arrays (Flower's FlatClip), the clipped updates are summed, and
    Gaussian noise of std z*C/D is drawn from numpy's global generator array by array in the model's order,
    as Flower draws it. The fixed-denominator mean is then w + (sum / D + noise), scaled by 1/q under Poisson
    sampling (module docstring).

    `canaries` (an audit run, server.audit.UserCanaries): canary clients' replies join the real ones, through
    the same clipping and noise; the auditor sees the released model, and their clipped contribution is
    then subtracted from the model the run keeps."""

    def __init__(self, strategy: UserDPStrategy, server_round: int, arrays: ArrayRecord, dp: DPConfig,
                 fraction: float, seed: int, canaries: Any = None) -> None:
        self.strategy, self.server_round, self.arrays = strategy, server_round, arrays
        self.dp, self.fraction, self.seed, self.canaries = dp, fraction, seed, canaries
        self.keys = list(arrays.keys())
        self.old = [as_numpy(arrays[key]) for key in self.keys]
        self._sum: list[np.ndarray] | None = None
        self._template: Message | None = None  # a real reply's metrics, for the canaries' replies

    def add(self, reply: Message) -> None:
        self._template = self._template or reply
        self._fold(_clipped_update(reply.content["arrays"], self.keys, self.old, self.strategy.clipping_norm))

    def _fold(self, clipped: list[np.ndarray]) -> None:
        # 0 + first, then in place: the same additions, in the same order, as sum() over the clipped updates
        if self._sum is None:
            self._sum = [0 + c for c in clipped]
        else:
            for total, c in zip(self._sum, clipped, strict=True):
                np.add(total, c, out=total)

    def result(self) -> ArrayRecord:
        if self._sum is None:
            return self.arrays
        canary_updates = []
        if self.canaries is not None:
            for reply in self.canaries.replies(self.server_round, self.arrays, self._template):
                canary_updates.append(_clipped_update(reply.content["arrays"], self.keys, self.old,
                                                      self.strategy.clipping_norm))
                self._fold(canary_updates[-1])
        d = self.strategy.num_sampled_clients
        std = noise_std(self.strategy)
        # Flower draws the noise from numpy's global generator; seeding it per round keeps runs reproducible.
        np.random.seed([self.seed, self.server_round])
        noise = [np.random.normal(0, std, o.shape).astype(o.dtype) for o in self.old]
        scale = 1.0 / self.fraction if self.dp.client_sampling == "poisson" else 1.0
        out = [o + scale * (self._sum[i] / d + noise[i]) for i, o in enumerate(self.old)]
        if self.canaries is not None:
            self.canaries.observe(self.server_round, self.old, out)
            out = [v - scale * sum(c[i] for c in canary_updates) / d for i, v in enumerate(out)]
        return array_record({key: np.asarray(v, dtype=self.old[i].dtype)
                             for i, (key, v) in enumerate(zip(self.keys, out, strict=True))})


def noise_std(strategy: UserDPStrategy) -> float:
    """z*C/D: the std of the noise on the fixed-denominator mean (the one place it is sized; the audit's tests
    break it here)."""
    return strategy.noise_multiplier * strategy.clipping_norm / strategy.num_sampled_clients


def _clipped_update(record: ArrayRecord, keys: list[str], old: list[np.ndarray], clip: float) -> list[np.ndarray]:
    """The reply's update w_k - w, scaled to L2 norm at most `clip` over all its arrays."""
    update = [np.subtract(as_numpy(record[key]), o) for key, o in zip(keys, old, strict=True)]
    norm = float(np.sqrt(sum(float(np.linalg.norm(u.ravel())) ** 2 for u in update)))
    factor = min(1.0, clip / norm) if norm > 0 else 1.0
    return [u * factor for u in update] if factor < 1.0 else update
