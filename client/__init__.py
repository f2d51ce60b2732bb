"""The data owner: its data, local training (plain and DP-SGD), its privacy ledger and budget guard, the ClientApp."""

from client.config import ConfigError, DataConfig, TrainConfig
from client.datasets import DATASETS, DataError, Dataset, load_dataset
from client.localfile import load_local_file
from client.partitions import holdout_split, parse_partition, partition_indices
from client.task import ClientData, client_seed, file_data, partition_data
from client.training import classification_metrics, evaluate, train

__all__ = [
    "DATASETS",
    "ClientData",
    "ConfigError",
    "DataConfig",
    "DataError",
    "Dataset",
    "TrainConfig",
    "classification_metrics",
    "client_seed",
    "evaluate",
    "file_data",
    "holdout_split",
    "load_dataset",
    "load_local_file",
    "parse_partition",
    "partition_data",
    "partition_indices",
    "train",
]
