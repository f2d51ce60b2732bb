"""What one client trains on: its share of a named dataset (simulation) or its own file (deployment)."""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from common.config import DataConfig
from common.datasets import DataError, dataset_spec, load_dataset
from common.localfile import load_local_file
from common.partitions import holdout_split, partition_indices
from models import TaskSpec


@dataclass(frozen=True)
class ClientData:
    client_id: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    spec: TaskSpec

    @property
    def num_examples(self) -> int:
        return len(self.y_train)


def client_seed(seed: int, server_round: int, client_id: str) -> int:
    """A seed per (run seed, round, client), stable across processes (str hash() is salted per process)."""
    return int(np.random.SeedSequence([seed, server_round, zlib.crc32(client_id.encode())]).generate_state(1)[0])


@lru_cache(maxsize=4)
def _partitions(dataset: str, data_dir: str, partition: str, num_clients: int, seed: int,
                max_length: int = 0, stride: int | None = None) -> tuple[np.ndarray, ...]:
    # Cached because a simulated client is rebuilt for every message: without it every round re-partitions.
    ds = load_dataset(dataset, data_dir or None, max_length or None, stride)
    return tuple(partition_indices(ds.y_train, partition, num_clients, seed, groups=ds.groups))


@lru_cache(maxsize=1 << 16)
def _split(dataset: str, data_dir: str, partition: str, num_clients: int, seed: int, max_length: int,
           holdout_fraction: float, partition_id: int, stride: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    # A client's (train, held-out) indices, drawn once per process: every message of every round asks again.
    indices = _partitions(dataset, data_dir, partition, num_clients, seed, max_length, stride)[partition_id]
    train_idx, val_idx = holdout_split(indices, holdout_fraction, seed + partition_id)
    train_idx.flags.writeable = val_idx.flags.writeable = False  # shared by every later call
    return train_idx, val_idx


def partition_data(cfg: DataConfig, partition_id: int) -> ClientData:
    """Partition `partition_id` of cfg.dataset, split into local train and held-out parts."""
    if not 0 <= partition_id < cfg.num_clients:
        raise DataError(f"partition-id {partition_id} is out of range for num-clients {cfg.num_clients}")
    ds = load_dataset(cfg.dataset, cfg.data_dir or None, cfg.text_max_length, cfg.text_stride)
    train_idx, val_idx = _split(cfg.dataset, cfg.data_dir, cfg.partition, cfg.num_clients, cfg.seed,
                                cfg.text_max_length, cfg.holdout_fraction, partition_id, cfg.text_stride)
    return ClientData(str(partition_id), ds.x_train[train_idx], ds.y_train[train_idx], ds.x_train[val_idx],
                      ds.y_train[val_idx], ds.spec)


def file_data(path: str | Path, cfg: DataConfig, client_id: str | None = None) -> ClientData:
    """A data owner's own file, checked against the run's task (shape and label set of cfg.dataset)."""
    x, y = load_local_file(path)
    spec = dataset_spec(cfg.dataset, cfg.text_max_length)
    if tuple(x.shape[1:]) != tuple(spec.input_shape):
        raise DataError(f"{path}: examples have shape {tuple(x.shape[1:])}, the run's {cfg.dataset} model needs "
                        f"{tuple(spec.input_shape)}; reshape the file or join a run for this data")
    if y.min() < 0 or y.max() >= spec.num_classes:
        raise DataError(f"{path}: labels span {int(y.min())}..{int(y.max())}, the run's {cfg.dataset} task has "
                        f"classes 0..{spec.num_classes - 1}; relabel the file")
    dtype = np.int64 if spec.vocab_size else np.float32
    x = x.astype(dtype, copy=False)
    train_idx, val_idx = holdout_split(np.arange(len(y)), cfg.holdout_fraction, cfg.seed)
    cid = client_id or Path(path).stem
    return ClientData(cid, x[train_idx], y[train_idx], x[val_idx], y[val_idx], spec)
