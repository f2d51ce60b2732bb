"""The centralized baseline: one client holding the union of every client's data, run by the same apps.

Everything but the number of data owners stays as in the federated run it is compared with: the same model,
optimizer, learning rate, batch size, local epochs (so one round is one pass over the data), the same DP-SGD
settings and target epsilon, the same server test set and seed. Only who holds the data changes.

- For a label partition (iid, dirichlet, pathological) the clients together hold the whole training set, so
  the baseline is the same run with `num-clients = 1` (its single partition is the whole set).
- For the natural partition the clients are the `num-clients` largest natural groups, not the whole set, so
  the baseline is one node whose data file holds exactly those groups' examples (Flower's `data-path` node
  config, the deployment path of the same ClientApp).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from common import DataConfig, parse_partition, partition_data

CENTRAL_CLIENT_ID = "central"


NodeConfigs = tuple[dict[str, Any], ...]


def centralized_run(run_config: Mapping[str, Any],
                    data_root: Path) -> tuple[dict[str, Any], NodeConfigs | None]:
    """(run config, node configs or None) of the centralized counterpart of a federated `run_config`."""
    data = DataConfig.from_run_config(run_config)
    central = {**run_config, "num-clients": 1}
    if parse_partition(data.partition).kind != "natural":
        return {**central, "partition": "iid"}, None
    path = union_file(data, data_root)
    return central, ({"data-path": str(path), "client-id": CENTRAL_CLIENT_ID},)


def union_file(data: DataConfig, data_root: Path) -> Path:
    """An .npz (arrays x, y) with every example of the natural clients of `data`, written once.

    Each client's held-out part is included too: the central node holds out the same fraction of the union
    (holdout-fraction), so it trains on as many examples as the clients together do."""
    # Every setting that changes the examples is in the name, so a cached union is never another run's
    # (the defaults add nothing: files written before these keys existed keep their names).
    variant = "".join(f"-{word}{value}" for word, key, value in (("stride", "text-stride", data.text_stride),
                                                                 ("length", "text-max-length", data.text_max_length))
                      if value != DataConfig.DEFAULTS[key])
    path = data_root / f"{data.dataset}-natural-{data.num_clients}-clients{variant}-union.npz"
    if path.is_file():
        return path
    parts = [partition_data(data, i) for i in range(data.num_clients)]
    x = np.concatenate([a for p in parts for a in (p.x_train, p.x_val)])
    y = np.concatenate([a for p in parts for a in (p.y_train, p.y_val)])
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp.npz")
    np.savez(tmp, x=x, y=y)
    tmp.replace(path)  # a reader never sees half a file
    return path
