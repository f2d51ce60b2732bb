"""Model zoo behind one registry; every registered model trains with Opacus DP-SGD.

Usage: `build_model("cnn", TaskSpec(input_shape=(1, 28, 28), num_classes=10), seed=0)`.

Names are imported on first use (PEP 562): `from models import TaskSpec` (what a dataset needs) must not
import torch. The registry is filled, by importing the model modules, before any registry function is given out.
"""

from __future__ import annotations

import importlib
from typing import Any

from models.task import ModelError, TaskSpec

_EXPORTS = {
    "build_model": "models.registry", "model_names": "models.registry", "register_model": "models.registry",
    "check_trainable_with_dp": "models.dp_check",
    "split_stages": "models.scatter", "StagedModel": "models.scatter",
}

__all__ = ["ModelError", "TaskSpec", *sorted(_EXPORTS)]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'models' has no attribute {name!r}")
    module = importlib.import_module(_EXPORTS[name])
    # Imported for their @register_model side effect: this fills the registry.
    from models import dense, minilm, scatter, sequence, vision  # noqa: F401

    value = getattr(module, name)
    globals()[name] = value
    return value
