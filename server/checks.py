"""Checks on what a client sends back, before it can reach the global model."""

from __future__ import annotations

import math

import numpy as np
from flwr.app import ArrayRecord, Message, MetricRecord

from common.arrays import as_numpy
from common.messages import get_record


def update_problem(reply: Message, reference: ArrayRecord, weight_key: str = "num-examples") -> str | None:
    """Why this training reply must not be aggregated, in one line; None when it is fine."""
    if reply.has_error():
        return f"client failed: {reply.error.reason.strip().splitlines()[-1] if reply.error.reason else 'no reason'}"
    content = reply.content
    arrays = get_record(content, "arrays", ArrayRecord)
    if arrays is None:
        return "reply holds no model update"
    if set(arrays.keys()) != set(reference.keys()):
        missing = sorted(set(reference.keys()) - set(arrays.keys()))
        extra = sorted(set(arrays.keys()) - set(reference.keys()))
        return f"update has the wrong parameters (missing {missing[:3]}, unexpected {extra[:3]})"
    for key, ref in reference.items():
        got = arrays[key]
        if tuple(got.shape) != tuple(ref.shape):
            return f"update for {key!r} has shape {tuple(got.shape)}, the model has {tuple(ref.shape)}"
        values = as_numpy(got)
        if np.issubdtype(values.dtype, np.floating) and not np.isfinite(values).all():
            return f"update for {key!r} holds NaN or Inf values"
    metrics = get_record(content, "metrics", MetricRecord)
    if metrics is None or weight_key not in metrics:
        return f"reply has no {weight_key!r} metric"
    weight = metrics[weight_key]
    if not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight <= 0:
        return f"reply reports {weight_key} = {weight!r}; it must be a positive number"
    return None
