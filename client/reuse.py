"""What a ClientApp process keeps between messages: a model per (architecture, task), its optimizer, and the
last global weights it decoded.

Flower builds the ClientApp's handler anew for every message, and a simulated node gets thousands of them;
building a module, an optimizer and decoding the same global weights for each was most of a small client's
time. Everything kept here is overwritten before use (weights loaded in place, optimizer state cleared), so
a client's result is the same as with fresh objects, bit for bit (tests/test_engine_speed.py checks it).
Not for DP-SGD: Opacus wraps a module once and cannot wrap it again, so that path builds a fresh one.
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from common.config import TrainConfig
from common.training import make_optimizer
from models import TaskSpec, build_model

_MODELS: dict[tuple[str, TaskSpec], nn.Module] = {}
_OPTIMIZERS: dict[tuple[int, str, float, float, float], torch.optim.Optimizer] = {}
# Array name -> (the serialized bytes object it was decoded from, the decoded tensor). One entry per name:
# in-process, the 50 messages of a round carry one and the same ArrayRecord, decoded once here.
_DECODED: dict[str, tuple[bytes, torch.Tensor]] = {}
# model -> its tensors by state-dict key, for copying weights in without load_state_dict's walk over every
# submodule on every message; None for a model whose loading runs hooks (e.g. minilm's).
# Weak keys: a DP client builds a fresh module per message, and a recycled id() must never find old tensors.
_TARGETS: weakref.WeakKeyDictionary[nn.Module, dict[str, torch.Tensor] | None] = weakref.WeakKeyDictionary()
# model -> (the decoded tensors last copied in, each target's version counter right after): while no counter
# has moved (torch bumps it on every in-place write, optimizer steps included) the model still holds them.
_HOLDS: weakref.WeakKeyDictionary[nn.Module, tuple[list[torch.Tensor], list[int]]] = weakref.WeakKeyDictionary()


def reusable_model(name: str, spec: TaskSpec) -> nn.Module:
    """This process's module for (name, spec), built once; load weights into it before every use."""
    key = (name, spec)
    if key not in _MODELS:
        _MODELS[key] = build_model(name, spec)
    return _MODELS[key]


def reusable_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """An optimizer over `model` with cfg's settings and no state (momentum, Adam moments), as a new one."""
    key = (id(model), cfg.optimizer, cfg.learning_rate, cfg.momentum, cfg.weight_decay)
    optimizer = _OPTIMIZERS.get(key)
    if optimizer is None:
        optimizer = _OPTIMIZERS[key] = make_optimizer(model.parameters(), cfg)
    optimizer.state.clear()
    return optimizer


def decoded_state(arrays: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """A Flower ArrayRecord as a torch state dict, decoding each Array only when its bytes are new.

    The bytes objects are compared by identity and kept referenced, so a hit is always the same bytes;
    the tensors are only ever read (load_state_dict copies them into the model)."""
    state: dict[str, torch.Tensor] = {}
    for key, array in arrays.items():
        hit = _DECODED.get(key)
        if hit is None or hit[0] is not array.data:
            hit = _DECODED[key] = (array.data, torch.from_numpy(array.numpy()))
        state[key] = hit[1]
    return state


def load_global(model: nn.Module, arrays: Mapping[str, Any], *, read_only: bool = False) -> nn.Module:
    """Load the message's weights into `model` in place (strict: every key and shape must match).

    read_only: the caller only evaluates the model; when it still holds these very weights (the round's other
    evaluate messages carry the same record, and nothing has written to the model since) nothing is copied."""
    state = decoded_state(arrays)
    targets = _targets(model)
    if targets is None:
        model.load_state_dict(state)
        return model
    tensors = list(state.values())
    held = _HOLDS.get(model)
    if (read_only and held is not None and len(held[0]) == len(tensors)
            and all(a is b for a, b in zip(held[0], tensors, strict=True))
            and held[1] == [t._version for t in targets.values()]):
        return model
    # copy_ would broadcast a wrongly shaped array; load_state_dict names the key and shape instead.
    if state.keys() != targets.keys() or any(targets[k].shape != t.shape for k, t in state.items()):
        model.load_state_dict(state)
    else:
        with torch.no_grad():
            for key, tensor in state.items():
                targets[key].copy_(tensor)
    _HOLDS[model] = (tensors, [t._version for t in targets.values()])
    return model


def _targets(model: nn.Module) -> dict[str, torch.Tensor] | None:
    if model not in _TARGETS:
        hooked = any(m._load_state_dict_pre_hooks or m._load_state_dict_post_hooks or m._state_dict_hooks
                     or m._state_dict_pre_hooks for m in model.modules())
        _TARGETS[model] = None if hooked else model.state_dict(keep_vars=True)
    return _TARGETS[model]
