"""Models that flatten their input: logistic regression and a small MLP (tabular rows or images)."""

from __future__ import annotations

import math

from torch import nn

from models.registry import register_model
from models.task import TaskSpec


def _flat_size(spec: TaskSpec) -> int:
    return math.prod(spec.input_shape)


@register_model("logreg", kinds=("tabular", "image"))
def build_logreg(spec: TaskSpec) -> nn.Module:
    """Multinomial logistic regression: one Linear layer on the flattened input."""
    return nn.Sequential(nn.Flatten(), nn.Linear(_flat_size(spec), spec.num_classes))


@register_model("mlp", kinds=("tabular", "image"))
def build_mlp(spec: TaskSpec) -> nn.Module:
    """Two hidden ReLU layers (256, 128) on the flattened input."""
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(_flat_size(spec), 256),
        nn.ReLU(),
        nn.Linear(256, 128),
        nn.ReLU(),
        nn.Linear(128, spec.num_classes),
    )
