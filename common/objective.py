"""What a model is trained to predict: each example's label, or, for a causal language model, every next token.

A model with `every_position = True` (models/sequence.py's `gpt`) has `forward_every_position(x)` giving
(batch, length, classes) logits; position t predicts token t + 1 of the window and the last position predicts the
label. Its loss per example is the mean over positions, so an example (one window) stays the unit of clipping and
of DP accounting. Every other model is trained on `model(x)` against the label, as before. The trainers (plain,
book-keeping and Opacus DP-SGD) all go through here, so they cannot disagree about what an example's loss is.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _inner(model: nn.Module) -> nn.Module:
    return getattr(model, "_module", model)  # Opacus' GradSampleModule keeps the model as `_module`


def every_position(model: nn.Module) -> bool:
    return bool(getattr(_inner(model), "every_position", False))


def training_outputs(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Logits to train on: (batch, classes), or (batch, length, classes) for an every-position model. Through
    the inner module for an Opacus wrapper: its hooks sit on the layers, so they fire either way."""
    if every_position(model):
        return _inner(model).forward_every_position(x)
    return model(x)


def next_tokens(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(batch, length) targets of an every-position model: the window shifted left by one, then the label."""
    return torch.cat([x[:, 1:].long(), y.reshape(-1, 1).long()], dim=1)  # class indices: int64, as torch wants


def last_logits(outputs: torch.Tensor) -> torch.Tensor:
    """The logits that predict the label (for accuracy): the last position of an every-position output."""
    return outputs[:, -1] if outputs.dim() == 3 else outputs


def _flat(outputs: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """An every-position output and its targets as (batch * length, classes) and (batch * length,)."""
    batch, length, classes = outputs.shape
    return outputs.reshape(batch * length, classes), next_tokens(x, y).reshape(batch * length)


def loss(outputs: torch.Tensor, x: torch.Tensor, y: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy per example (an every-position output: the mean over its positions), then summed or averaged
    over the batch. A mean over the batch of equal-length means is also the mean over all positions."""
    if outputs.dim() != 3:
        return F.cross_entropy(outputs, y, reduction=reduction)
    batch, length, _ = outputs.shape
    total = F.cross_entropy(*_flat(outputs, x, y), reduction="sum")
    return total / length if reduction == "sum" else total / (length * batch)


def criterion_loss(criterion, outputs: torch.Tensor, x: torch.Tensor, y: torch.Tensor,  # noqa: ANN001
                   ghost: bool) -> torch.Tensor:
    """The Opacus path's loss: `criterion` is nn.CrossEntropyLoss (mean), or under ghost clipping Opacus' loss
    wrapper, which takes sequence outputs flattened with their shape and averages each sequence's positions."""
    if outputs.dim() != 3:
        return criterion(outputs, y)
    flat = _flat(outputs, x, y)
    return criterion(*flat, shape=outputs.shape) if ghost else criterion(*flat)
