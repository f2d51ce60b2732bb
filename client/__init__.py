"""The data owner: its data, local training (plain and DP-SGD), its privacy ledger and budget guard, the ClientApp.

Names are imported on first use (PEP 562): `from client import ConfigError` must not pull in torch, so that
`fedpriv --help` and the commands that need no training start in well under a second.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ConfigError": "client.config", "DataConfig": "client.config", "TrainConfig": "client.config",
    "DATASETS": "client.datasets", "DataError": "client.datasets", "Dataset": "client.datasets",
    "load_dataset": "client.datasets",
    "load_local_file": "client.localfile",
    "holdout_split": "client.partitions", "parse_partition": "client.partitions",
    "partition_indices": "client.partitions",
    "ClientData": "client.task", "client_seed": "client.task", "file_data": "client.task",
    "partition_data": "client.task",
    "classification_metrics": "client.training", "evaluate": "client.training", "train": "client.training",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'client' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value
