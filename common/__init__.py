"""What both apps need, below both (as Flower's quickstart keeps task.py below its ClientApp and ServerApp): the
run config's training and data settings, datasets and their partitions, local training and evaluation, the
Flower Array codec, compressed updates, devices, SecAgg's codec and crypto, and the processes and waits of a
deployment. `client/` (the data owner's ClientApp, DP-SGD, ledger and guard) and `server/` (the coordinator)
import this package and never each other.

Names are imported on first use (PEP 562): `from common import ConfigError` must not pull in torch, so that
`fedpriv --help` and the commands that need no training start in well under a second.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ConfigError": "common.config", "DataConfig": "common.config", "TrainConfig": "common.config",
    "DATASETS": "common.datasets", "DataError": "common.datasets", "Dataset": "common.datasets",
    "load_dataset": "common.datasets",
    "load_local_file": "common.localfile",
    "holdout_split": "common.partitions", "parse_partition": "common.partitions",
    "partition_indices": "common.partitions",
    "ClientData": "common.task", "client_seed": "common.task", "file_data": "common.task",
    "partition_data": "common.task",
    "classification_metrics": "common.training", "evaluate": "common.training", "train": "common.training",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'common' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value
