"""An exponential moving average (EMA) of the global model, kept by the server.

With DP noise in every update, the last global model is a noisy point; an average over the last few rounds'
models is a better estimate of where training is heading (De et al. 2022 and Tramer & Boneh use it). It is
computed from models the server already holds, so it is post-processing: it costs no privacy. The run's
records report it beside the raw model (`ema_*` server metrics), never in place of it.

ema_1 = w_1 (the first aggregated model, not the random initialisation, which would drag a short run back);
ema_t = decay * ema_{t-1} + (1 - decay) * w_t.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from privacy.files import write_atomic

PREFIX = "ema_"


class ModelEMA:
    def __init__(self, decay: float, state: Mapping[str, np.ndarray] | None = None) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"ema decay {decay} is out of range; it must be in (0, 1)")
        self.decay = decay
        self.state: dict[str, np.ndarray] | None = (
            {k: np.array(v, copy=True) for k, v in state.items()} if state is not None else None
        )

    def update(self, arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Fold in this round's global model; returns the average."""
        if self.state is None or set(self.state) != set(arrays):
            self.state = {k: np.array(v, copy=True) for k, v in arrays.items()}
            return self.state
        for key, value in arrays.items():
            value = np.asarray(value)
            if np.issubdtype(value.dtype, np.floating):
                self.state[key] = (self.decay * self.state[key] + (1.0 - self.decay) * value).astype(value.dtype)
            else:  # counters and other integer buffers are not averaged: take the latest
                self.state[key] = np.array(value, copy=True)
        return self.state


def prefixed(metrics: Mapping[str, float]) -> dict[str, float]:
    return {f"{PREFIX}{k}": v for k, v in metrics.items()}


def save_ema(out_dir: Path, state: Mapping[str, np.ndarray]) -> Path:
    """model_ema.pt beside model.pt, in the same format (a torch state dict)."""
    path = Path(out_dir) / "model_ema.pt"
    buffer = io.BytesIO()
    torch.save({k: torch.from_numpy(np.array(v)) for k, v in state.items()}, buffer)
    write_atomic(path, buffer.getvalue())
    return path
