"""Name -> model factory registry, with a compatibility check per model."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn

from models.task import TASK_KINDS, ModelError, TaskKind, TaskSpec

Factory = Callable[[TaskSpec], nn.Module]
Fits = Callable[[TaskSpec], bool]

_NAME_PATTERN = re.compile(r"^[a-z][a-z0-9_-]*$")
_KIND_WORDS = {"image": "images", "tabular": "tabular rows", "sequence": "token sequences"}


@dataclass(frozen=True)
class _Entry:
    factory: Factory
    kinds: tuple[TaskKind, ...]
    needs: str  # what the model needs, in words, for error messages
    fits: Fits | None  # finer check than the kind, e.g. an image size

    def accepts(self, spec: TaskSpec) -> bool:
        return spec.kind in self.kinds and (self.fits is None or self.fits(spec))


# The one table of models: filled by @register_model when models/__init__ imports the model modules.
_REGISTRY: dict[str, _Entry] = {}


def register_model(
    name: str,
    *,
    kinds: Iterable[TaskKind],
    needs: str | None = None,
    fits: Fits | None = None,
) -> Callable[[Factory], Factory]:
    """Register a factory `(spec) -> nn.Module` under `name`.

    kinds: the task kinds the model accepts ("image", "tabular", "sequence").
    fits: optional finer check on the spec (e.g. image size); `needs` then says in words what it needs.
    """
    if not isinstance(name, str) or not _NAME_PATTERN.match(name):
        raise ModelError(
            f"model name {name!r} is not allowed; "
            "use lowercase letters, digits, '_' and '-', starting with a letter"
        )
    kinds = tuple(kinds)
    bad = [k for k in kinds if k not in TASK_KINDS]
    if not kinds or bad:
        raise ModelError(
            f"kinds {kinds!r} for model '{name}' are not allowed; choose from: {', '.join(TASK_KINDS)}"
        )
    if needs is None:
        needs = " or ".join(_KIND_WORDS[k] for k in kinds)

    def decorator(factory: Factory) -> Factory:
        if name in _REGISTRY:
            raise ModelError(f"model '{name}' is already registered; register it under another name")
        _REGISTRY[name] = _Entry(factory=factory, kinds=kinds, needs=needs, fits=fits)
        return factory

    return decorator


def model_names() -> list[str]:
    """Names of all registered models, sorted."""
    return sorted(_REGISTRY)


def _fitting_models(spec: TaskSpec) -> list[str]:
    return [name for name in model_names() if _REGISTRY[name].accepts(spec)]


def build_model(name: str, spec: TaskSpec, *, seed: int | None = None) -> nn.Module:
    """Build model `name` for `spec`, in training mode.

    With a seed, initialisation is deterministic and the caller's global RNG state is left untouched.
    """
    if not isinstance(spec, TaskSpec):
        raise ModelError(f"spec must be a TaskSpec, got {type(spec).__name__}; build one with TaskSpec(...)")
    entry = _REGISTRY.get(name) if isinstance(name, str) else None
    if entry is None:
        raise ModelError(f"unknown model {name!r}; choose one of: {', '.join(model_names())}")
    if not entry.accepts(spec):
        fitting = _fitting_models(spec)
        suggestion = f"models that fit: {', '.join(fitting)}" if fitting else "no registered model fits it"
        raise ModelError(
            f"model '{name}' needs {entry.needs}, but the dataset gives {spec.describe()}; {suggestion}"
        )
    if seed is None:
        model = entry.factory(spec)
    else:
        if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
            raise ModelError(f"seed {seed!r} is not allowed; use a non-negative int, or None")
        # fork_rng restores the RNGs afterwards, so seeding a model does not reseed data shuffling.
        # manual_seed also seeds every CUDA device, so their states must be saved and restored too.
        cuda_devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
        with torch.random.fork_rng(devices=cuda_devices):
            torch.manual_seed(seed)
            model = entry.factory(spec)
    return model.train()
