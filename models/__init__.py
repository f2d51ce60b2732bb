"""Model zoo behind one registry; every registered model trains with Opacus DP-SGD.

Usage: `build_model("cnn", TaskSpec(input_shape=(1, 28, 28), num_classes=10), seed=0)`.
"""

from models.dp_check import check_trainable_with_dp
from models.registry import build_model, model_names, register_model
from models.scatter import StagedModel, split_stages
from models.task import ModelError, TaskSpec

# Imported for their @register_model side effect: this fills the registry.
from models import dense, scatter, sequence, vision  # noqa: E402,F401  isort: skip

__all__ = [
    "ModelError",
    "TaskSpec",
    "build_model",
    "check_trainable_with_dp",
    "model_names",
    "register_model",
    "split_stages",
    "StagedModel",
]
