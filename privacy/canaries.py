"""Canaries of an empirical privacy audit, all derived from one seed (pure numpy: no torch, no Flower).

Each of m canaries is included in training independently with probability 1/2 (`inclusion`); the auditor
knows which, the attack does not. Two kinds:

- Gradient (Dirac) canaries, sample level: canary j is a fake example whose gradient is zero except one
  coordinate (a parameter name and a flat index into it). `GradientCanaries.rows(step)` says which included
  canaries Poisson sampling puts into a DP-SGD step, at the same rate q as the real examples, each with a
  gradient value of `VALUE_IN_CLIPS` clipping norms: larger than the norm, so the clipping must act.
  The value is negative times the canary's sign, so a gradient-descent step pushes the coordinate towards
  that sign; the score is the coordinate's movement times the sign.
- Client canaries, user level: canary j is a fake client whose update is C times a seeded random unit vector
  over all the model's parameters (`client_direction`). Its score is the inner product of that direction with
  the sum of the released noisy aggregates.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np

VALUE_IN_CLIPS = 10.0
# Seed streams, so that the inclusion bits, the coordinates, the sampling and the directions never share draws.
_INCLUDE, _COORDS, _SAMPLE, _DIRECTION, _CLIENTS = 0, 1, 2, 3, 4


def inclusion(m: int, seed: int) -> np.ndarray:
    """Which of the m canaries are included (independently, probability 1/2)."""
    return np.random.default_rng([seed, _INCLUDE]).random(m) < 0.5


@dataclass(frozen=True)
class GradientCanary:
    name: str  # parameter name, as in model.named_parameters()
    index: int  # flat index into that parameter
    sign: float  # +1 or -1: the direction the canary pushes the coordinate
    included: bool


def gradient_canaries(sizes: list[tuple[str, int]], m: int, seed: int) -> list[GradientCanary]:
    """m canaries on distinct coordinates drawn uniformly over all the parameters (name, number of values)."""
    total = sum(n for _, n in sizes)
    if m > total:
        from privacy.accounting import PrivacyError

        raise PrivacyError(f"{m} canaries need {m} distinct coordinates; the model has {total}: use fewer canaries")
    rng = np.random.default_rng([seed, _COORDS])
    flat = np.sort(rng.choice(total, size=m, replace=False))
    flat = flat[rng.permutation(m)]  # canary order independent of coordinate order
    signs = np.where(rng.random(m) < 0.5, 1.0, -1.0)
    starts = np.cumsum([0] + [n for _, n in sizes])
    included = inclusion(m, seed)
    out = []
    for j, f in enumerate(flat):
        layer = int(np.searchsorted(starts, f, side="right") - 1)
        out.append(GradientCanary(sizes[layer][0], int(f - starts[layer]), float(signs[j]), bool(included[j])))
    return out


class GradientCanaries:
    """The `rows(step)` object client.dpsgd.train_private takes: the included canaries sampled into each step."""

    def __init__(self, canaries: list[GradientCanary], sample_rate: float, max_grad_norm: float, seed: int,
                 server_round: int, client_id: str) -> None:
        self.canaries = [c for c in canaries if c.included]
        self.sample_rate, self.value = sample_rate, VALUE_IN_CLIPS * max_grad_norm
        # One sampling stream per (audit seed, round, host client): rounds draw independently.
        self._seed = [seed, _SAMPLE, server_round, zlib.crc32(client_id.encode())]

    def rows(self, step: int) -> list[tuple[str, int, float]]:
        u = np.random.default_rng([*self._seed, step]).random(len(self.canaries))
        return [(c.name, c.index, -c.sign * self.value) for c, draw in zip(self.canaries, u, strict=True)
                if draw < self.sample_rate]


def client_direction(j: int, size: int, seed: int) -> np.ndarray:
    """Canary client j's unit vector over the flattened model (length `size`; float32 draws, twice as fast)."""
    v = np.random.default_rng([seed, _DIRECTION, j]).standard_normal(size, dtype=np.float32).astype(np.float64)
    return v / np.linalg.norm(v)


def sampled_clients(m: int, rate: float, seed: int, server_round: int) -> np.ndarray:
    """Indices of the canary clients Poisson-sampled into a round, at the real clients' rate."""
    return np.flatnonzero(np.random.default_rng([seed, _CLIENTS, server_round]).random(m) < rate)
