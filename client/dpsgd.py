"""Sample-level DP on a client: one round of Opacus DP-SGD with Poisson sampling.

A fresh model object and a fresh PrivacyEngine every round (Opacus cannot wrap a module twice); the privacy
history does not live in the engine but in the client's ledger (privacy.PrivacyLedger), which composes every
round. Opacus' own accountant is therefore never read.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from opacus import PrivacyEngine
from opacus.optimizers import DPOptimizerFastGradientClipping
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from client.bookkeeping import BK_MODE, Canaries, bk_unsupported, train_bookkeeping
from common import objective
from common.allocator import keep_freed_memory
from common.config import TrainConfig
from common.training import as_tensor, make_optimizer

# Ghost clipping computes per-example gradient norms without materialising per-example gradients: exact
# (the same clipped gradient as "hooks") and the fastest mode on the CNN here (benchmarks/dp_modes.py).
# It supports Linear, Conv, Embedding and the norm layers; a model with other trainable layers (DPLSTM)
# falls back to hooks.
FAST_MODE = "ghost"
FALLBACK_MODE = "hooks"


@dataclass(frozen=True)
class DPPlan:
    """What one round of DP-SGD on this client will spend: Poisson rate q and the number of steps."""

    sample_rate: float
    steps: int

    @classmethod
    def for_round(cls, num_examples: int, batch_size: int, local_epochs: int) -> DPPlan:
        # Opacus sets q = 1 / len(loader) = 1 / ceil(n / B); the ledger must record exactly that.
        batches = max(1, math.ceil(num_examples / batch_size))
        return cls(sample_rate=1.0 / batches, steps=local_epochs * batches)


def grad_sample_mode_for(model: nn.Module) -> str:
    supported = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Embedding, nn.LayerNorm, nn.GroupNorm)
    for module in model.modules():
        has_own_params = any(True for _ in module.parameters(recurse=False))
        if has_own_params and not isinstance(module, supported):
            return FALLBACK_MODE
    return FAST_MODE


def train_private(model: nn.Module, x: np.ndarray, y: np.ndarray, cfg: TrainConfig, *, noise_multiplier: float,
                  max_grad_norm: float, seed: int, grad_sample_mode: str | None = None,
                  canaries: Canaries | None = None) -> dict[str, float | str]:
    """One round of DP-SGD; trains `model` in place (its own keys, no `_module.` prefix). The result names the
    grad-sample mode used: book-keeping ("bk", client/bookkeeping.py) wherever it covers every trainable layer,
    else Opacus.

    `canaries` (an audit): extra examples whose per-example gradients go through the same clipping, sum, noise
    and division by the real data's expected batch size as the real ones. In the Opacus path they are appended
    to Opacus' per-example gradients before each step; ghost clipping never materialises those, so an audited
    Opacus run uses hooks (the two give exactly the same clipped gradient)."""
    keep_freed_memory()
    if grad_sample_mode in (None, "auto"):
        example = as_tensor(x[:1]) if len(x) else None  # one forward, no gradient: is any layer run twice?
        grad_sample_mode = BK_MODE if bk_unsupported(model, example) is None else grad_sample_mode_for(model)
    if grad_sample_mode == BK_MODE:
        return train_bookkeeping(model, x, y, cfg, noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
                                 seed=seed, canaries=canaries)
    dataset = TensorDataset(torch.from_numpy(x), torch.from_numpy(y))
    loader = DataLoader(dataset, batch_size=cfg.batch_size, generator=torch.Generator().manual_seed(seed))
    optimizer = make_optimizer(model.parameters(), cfg)
    mode = FALLBACK_MODE if canaries is not None else grad_sample_mode
    names = {id(p): name for name, p in model.named_parameters()}
    criterion = nn.CrossEntropyLoss()
    with warnings.catch_warnings():
        # Opacus warns on every engine that its RNG is not cryptographically secure (secure_mode needs
        # torchcsprng, not available here); seeded generators are what make runs reproducible.
        warnings.filterwarnings("ignore", message="Secure RNG turned off")
        engine = PrivacyEngine(accountant="rdp")
        private = engine.make_private(
            module=model, optimizer=optimizer, criterion=criterion, data_loader=loader,
            noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm, poisson_sampling=True,
            # On the model's device: Opacus draws the noise there, and a generator elsewhere is an error.
            noise_generator=torch.Generator(device=next(model.parameters()).device).manual_seed(seed + 1),
            grad_sample_mode=mode,
        )
    if mode == "ghost":
        wrapped, dp_optimizer, criterion, dp_loader = private
    else:
        wrapped, dp_optimizer, dp_loader = private
    wrapped.train()
    with warnings.catch_warnings():
        # Ghost clipping's second backward pass makes torch warn about full backward hooks on every step.
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        result = _epochs(wrapped, dp_optimizer, criterion, dp_loader, cfg.local_epochs, canaries, names)
        return {**result, "grad-sample-mode": mode}


def _add_canary_rows(dp_optimizer, rows: list[tuple[str, int, float]], names: dict[int, str]) -> None:  # noqa: ANN001
    """Append one per-example gradient per canary row to every parameter's grad_sample: zero everywhere
    except the row's coordinate."""
    for p in dp_optimizer.params:
        extra = torch.zeros((len(rows), *p.shape), dtype=p.dtype, device=p.device)
        flat = extra.view(len(rows), -1)
        for i, (name, index, value) in enumerate(rows):
            if name == names[id(p)]:
                flat[i, index] = value
        current = getattr(p, "grad_sample", None)
        p.grad_sample = extra if current is None else torch.cat([current, extra], dim=0)


def _empty_gradients(dp_optimizer) -> None:  # noqa: ANN001
    ghost = isinstance(dp_optimizer, DPOptimizerFastGradientClipping)
    for p in dp_optimizer.params:
        if ghost:
            p.grad = torch.zeros_like(p)
        else:
            p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)


def _epochs(wrapped: nn.Module, dp_optimizer, criterion, dp_loader, local_epochs: int,  # noqa: ANN001
            canaries: Canaries | None = None, names: dict[int, str] | None = None) -> dict[str, float]:
    total_loss, correct, seen, steps = 0.0, 0, 0, 0
    device = next(wrapped.parameters()).device  # the data stays on the host; each batch goes to the model
    for _ in range(local_epochs):
        for xb, yb in dp_loader:
            xb, yb = xb.to(device), yb.to(device)
            dp_optimizer.zero_grad(set_to_none=True)
            rows = canaries.rows(steps) if canaries is not None else []
            if len(yb) == 0:
                # Poisson sampling can draw an empty batch; it still counts as a step (noise only). No forward
                # pass runs on it (GroupNorm refuses empty inputs), so Opacus gets what a backward pass on no
                # examples would have left: no per-sample gradients, or a zero summed one (ghost clipping).
                _empty_gradients(dp_optimizer)
                if rows:
                    _add_canary_rows(dp_optimizer, rows, names or {})
                dp_optimizer.step()
                steps += 1
                continue
            outputs = objective.training_outputs(wrapped, xb)
            loss = objective.criterion_loss(criterion, outputs, xb, yb, ghost=isinstance(
                dp_optimizer, DPOptimizerFastGradientClipping))
            loss.backward()
            logits = objective.last_logits(outputs)
            if rows:
                _add_canary_rows(dp_optimizer, rows, names or {})
            dp_optimizer.step()
            steps += 1
            # Ghost clipping's loss is a wrapper object; the value itself comes from the detached logits.
            total_loss += float(nn.functional.cross_entropy(logits.detach(), yb)) * len(yb)
            correct += int((logits.argmax(1) == yb).sum())
            seen += len(yb)
    if hasattr(wrapped, "_close"):
        wrapped._close()  # removes Opacus' hooks so the plain module is left as it was
    return {"loss": total_loss / max(seen, 1), "accuracy": correct / max(seen, 1), "steps": float(steps)}
