"""Book-keeping DP-SGD (Bu, Wang, Zha, Karypis, ICML 2023): the clipped gradient from ONE backward pass.

Clipping only rescales each example's loss, so one `torch.autograd.grad` of the summed per-example loss to
every layer's output, with the layer inputs kept by forward hooks, gives each example's gradient norm and then
the clipped sum a^T diag(c) g (client/bk_rules.py, one rule per layer type). No weight-gradient kernel runs.

Everything around the clipping is done exactly as Opacus does it in client/dpsgd.py, so the accountant, the
DPPlan and the ledger need no change: Poisson sampling with the same generator draws (so the same batches for
the same seed, empty ones included), clipping factor min(1, C / (norm + 1e-6)), Gaussian noise of std z*C drawn
from the seeded noise generator parameter by parameter in optimizer order (the draws Opacus makes), and
division by the expected batch size int(n * q).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from client.bk_rules import RULES, Saved, forward_stats, unsupported_reason
from common import objective
from common.config import TrainConfig
from common.training import as_tensor, make_optimizer
from models.task import ModelError
from privacy.accounting import PrivacyError

BK_MODE = "bk"
CLIP_EPSILON = 1e-6  # Opacus' clipping factor is C / (norm + 1e-6); the same keeps both paths identical


class Canaries(Protocol):
    """Extra examples for the empirical audit: for DP-SGD step `step` (0-based, empty batches counted), rows of
    (parameter name, flat index, gradient value before clipping); each row is one example whose gradient is zero
    except at that coordinate."""

    def rows(self, step: int) -> list[tuple[str, int, float]]: ...


def clip_factors(norms: torch.Tensor, max_grad_norm: float) -> torch.Tensor:
    """Per-example clipping factors, for real examples and canaries alike."""
    return (max_grad_norm / (norms + CLIP_EPSILON)).clamp(max=1.0)


def check_no_shared_parameters(model: nn.Module) -> None:
    """Refuse tied weights: per-example norms add each layer's share, so a weight used by two layers would be
    counted as two and clipped wrongly. A frozen weight that shares memory with a trainable one would silently
    move with it, its own gradient never clipped; refused too."""
    owners: dict[int, str] = {}
    storages: dict[int, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in owners:
            raise ModelError(f"parameters '{owners[id(p)]}' and '{name}' are the same tensor (tied weights), which "
                             "DP-SGD cannot clip per example; give each layer its own copy of the weight")
        owners[id(p)] = name
        if p.requires_grad:
            storages[p.untyped_storage().data_ptr()] = name
    for name, p in model.named_parameters():
        shared = storages.get(p.untyped_storage().data_ptr())
        if not p.requires_grad and shared is not None:
            raise ModelError(f"frozen parameter '{name}' shares memory with trainable '{shared}', so it would "
                             "change without its gradient being clipped; freeze both, or give it its own .clone()")


def _trainable_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(name, m) for name, m in model.named_modules()
            if any(p.requires_grad for p in m.parameters(recurse=False))]


def bk_unsupported(model: nn.Module, example: torch.Tensor | None = None) -> str | None:
    """Why book-keeping cannot train this model (the first reason found), or None if it can.

    With `example` (a batch of inputs), one forward pass without gradients also checks that every trainable
    layer runs at most once per forward pass (a layer applied twice, e.g. per time step, has no rule here).
    """
    for name, module in _trainable_modules(model):
        reason = unsupported_reason(module)
        if reason is not None:
            return f"layer '{name or '<root>'}': {reason}"
    if example is not None:
        calls: dict[nn.Module, int] = {}
        hooks = [m.register_forward_hook(lambda mod, _i, _o: calls.__setitem__(mod, calls.get(mod, 0) + 1))
                 for _, m in _trainable_modules(model)]
        try:
            with torch.no_grad():
                model(example)
        finally:
            for hook in hooks:
                hook.remove()
        names = {m: n for n, m in model.named_modules()}
        for module, count in calls.items():
            if count > 1:
                return f"layer '{names[module]}' runs {count} times per forward pass"
    return None


@dataclass
class _Kept:
    module: nn.Module
    inputs: torch.Tensor
    output: torch.Tensor
    saved: Saved


class BookKeeper:
    """Forward hooks on every trainable layer of `model`; `clipped_sum` runs one forward and one backward."""

    def __init__(self, model: nn.Module) -> None:
        reason = bk_unsupported(model)
        if reason is not None:
            raise ModelError(f"book-keeping DP-SGD cannot train this model ({reason}); "
                             "use an Opacus grad-sample mode (ghost or hooks)")
        check_no_shared_parameters(model)
        self.model = model
        self._kept: list[_Kept] = []
        self._recording = False
        self._hooks = [m.register_forward_hook(self._keep) for _, m in _trainable_modules(model)]

    def _keep(self, module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        if self._recording:
            self._kept.append(_Kept(module, inputs[0].detach(), output, forward_stats(module, output)))

    def close(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    def clipped_sum(self, x: torch.Tensor, y: torch.Tensor,
                    max_grad_norm: float) -> tuple[dict[nn.Parameter, torch.Tensor], torch.Tensor, torch.Tensor]:
        """(sum over the batch of each example's clipped gradient, per parameter; the logits; the per-example
        gradient norms before clipping). Cross-entropy, as the client's training uses."""
        if len(y) == 0:  # an empty Poisson batch: nothing to clip (and GroupNorm rejects empty inputs)
            return {}, torch.zeros(0, 0), torch.zeros(0)
        self._kept = []
        self._recording = True
        try:
            outputs = objective.training_outputs(self.model, x)
        finally:
            self._recording = False
        kept, self._kept = self._kept, []
        if len({id(k.module) for k in kept}) != len(kept):
            raise ModelError("a layer ran twice in one forward pass, which book-keeping DP-SGD cannot clip; "
                             "use an Opacus grad-sample mode (hooks)")
        # reduction="sum": each output gradient row is then that example's own gradient (Opacus' "mean"
        # rescales its per-sample gradients by the batch size to the same thing).
        # An every-position model's example loss is the mean over its positions (common/objective.py).
        loss = objective.loss(outputs, x, y, reduction="sum")
        layer_outputs = [k.output for k in kept]
        grads = torch.autograd.grad(loss, layer_outputs, allow_unused=True) if layer_outputs else ()
        batch = x.shape[0]
        norm_sq = outputs.new_zeros(batch).detach()
        layers = []
        for k, g in zip(kept, grads, strict=True):
            g = torch.zeros_like(k.output) if g is None else g
            layer = RULES[type(k.module)](k.module, k.inputs, g.detach(), k.saved)
            norm_sq = norm_sq + layer.norm_sq
            layers.append(layer)
        norms = norm_sq.clamp(min=0).sqrt()  # a ghost norm can round a hair below zero
        factors = clip_factors(norms, max_grad_norm)
        sums: dict[nn.Parameter, torch.Tensor] = {}
        for layer in layers:
            for p, s in layer.clipped_sum(factors):
                sums[p] = sums[p] + s if p in sums else s
        return sums, objective.last_logits(outputs).detach(), norms


def poisson_batches(num_examples: int, sample_rate: float, steps: int,
                    generator: torch.Generator) -> Iterator[torch.Tensor]:
    """One pass of Opacus' DPDataLoader, draw for draw: the DataLoader takes a base seed from the generator when
    the pass starts, then each step keeps every example with probability q (possibly none)."""
    torch.empty((), dtype=torch.int64).random_(generator=generator)
    for _ in range(steps):
        mask = torch.rand(num_examples, generator=generator) < sample_rate
        yield mask.nonzero(as_tuple=False).reshape(-1)


def _add_canaries(sums: dict[nn.Parameter, torch.Tensor], rows: list[tuple[str, int, float]],
                  named: dict[str, nn.Parameter], max_grad_norm: float) -> None:
    """Each row is one more example whose gradient has a single non-zero coordinate: clipped by the same rule
    as the real examples (its norm is |value|) and added to the clipped sum."""
    if not rows:
        return
    values = torch.tensor([float(v) for _, _, v in rows], dtype=torch.float64)
    factors = clip_factors(values.abs(), max_grad_norm)
    for (name, index, _), value in zip(rows, (values * factors).tolist(), strict=True):
        p = named.get(name)
        if p is None:
            raise PrivacyError(f"canary row names parameter {name!r}, which is not a trainable parameter of the "
                               f"model; use a name from model.named_parameters(), e.g. {next(iter(named))!r}")
        if not 0 <= int(index) < p.numel():
            raise PrivacyError(f"canary row index {index} is out of range for parameter {name!r} "
                               f"({p.numel()} values); use a flat index in [0, {p.numel()})")
        if p not in sums:
            sums[p] = torch.zeros_like(p)
        sums[p].view(-1)[int(index)] += value


def gaussian_noise(std: float, reference: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """N(0, std^2) of `reference`'s shape: the one place BK draws its noise (the audit's tests break it here)."""
    return torch.normal(0.0, std, size=reference.shape, generator=generator, dtype=reference.dtype,
                        device=reference.device)


@dataclass
class NoisyStep:
    """What every DP-SGD step of a round shares: clipping norm, noise std z*C and its generator, the expected
    batch size, and the parameters in optimizer order (the order Opacus draws their noise in)."""

    keeper: BookKeeper
    optimizer: torch.optim.Optimizer
    max_grad_norm: float
    noise_std: float
    expected_batch: int
    noise: torch.Generator

    def __post_init__(self) -> None:
        self.params = [p for group in self.optimizer.param_groups for p in group["params"] if p.requires_grad]
        self.named = {name: p for name, p in self.keeper.model.named_parameters() if p.requires_grad}

    def __call__(self, xb: torch.Tensor, yb: torch.Tensor,
                 canary_rows: list[tuple[str, int, float]] | None = None) -> torch.Tensor:
        """One step on a batch (possibly empty: noise only); returns the batch's logits."""
        self.optimizer.zero_grad(set_to_none=True)
        sums, logits, _ = self.keeper.clipped_sum(xb, yb, self.max_grad_norm)
        if canary_rows:
            _add_canaries(sums, canary_rows, self.named, self.max_grad_norm)
        for p in self.params:
            summed = sums.get(p)
            grad = torch.zeros_like(p) if summed is None else summed
            if self.noise_std > 0:
                grad = gaussian_noise(self.noise_std, p, self.noise).add_(grad)  # in place: no third tensor
            p.grad = grad.div_(self.expected_batch)
        self.optimizer.step()
        return logits


def train_bookkeeping(model: nn.Module, x: np.ndarray, y: np.ndarray, cfg: TrainConfig, *,
                      noise_multiplier: float, max_grad_norm: float, seed: int,
                      canaries: Canaries | None = None) -> dict[str, float | str]:
    """One round of book-keeping DP-SGD, the same mechanism as client.dpsgd's Opacus path; trains in place."""
    xt, yt = as_tensor(x), as_tensor(y)
    num_examples = len(yt)
    if num_examples == 0:
        raise PrivacyError("DP-SGD needs at least one training example (the expected batch size would be 0); "
                           "give this client data or leave it out of sample-level DP")
    batches = max(1, math.ceil(num_examples / cfg.batch_size))
    sample_rate = 1 / batches  # what DPPlan.for_round records and Opacus uses
    sampling = torch.Generator().manual_seed(seed)  # indices are drawn on the host, as Opacus' loader does
    device = next(model.parameters()).device  # the data stays on the host; each batch goes to the model
    keeper = BookKeeper(model)
    step = NoisyStep(keeper, make_optimizer(model.parameters(), cfg), max_grad_norm, noise_multiplier * max_grad_norm,
                     expected_batch=int(num_examples * sample_rate),  # Opacus: int(len(dataset) * sample_rate)
                     noise=torch.Generator(device=device).manual_seed(seed + 1))  # Opacus' draws need it there
    model.train()
    total_loss, correct, seen, steps = 0.0, 0, 0, 0
    try:
        for _ in range(cfg.local_epochs):
            for idx in poisson_batches(num_examples, sample_rate, batches, sampling):
                xb, yb = xt[idx].to(device), yt[idx].to(device)
                logits = step(xb, yb, canaries.rows(steps) if canaries is not None else None)
                steps += 1
                if len(yb):
                    total_loss += float(F.cross_entropy(logits, yb)) * len(yb)
                    correct += int((logits.argmax(1) == yb).sum())
                    seen += len(yb)
    finally:
        keeper.close()
    return {"loss": total_loss / max(seen, 1), "accuracy": correct / max(seen, 1), "steps": float(steps),
            "grad-sample-mode": BK_MODE}
