"""Splitting a training set among simulated clients (IID, label-skewed, or by natural client id).

The splitting itself is Flower Datasets' partitioners run over a small Hugging Face table of
(label, idx[, group]); we read back the idx column, so callers get plain index arrays into their own
numpy data and never a copy of it.
"""

from __future__ import annotations

import contextlib
import functools
import io
import uuid
import warnings
from dataclasses import dataclass

import numpy as np

from common.datasets import DataError

KINDS: tuple[str, ...] = ("iid", "dirichlet", "pathological", "natural")
FORMS = "'iid', 'dirichlet:ALPHA' (ALPHA > 0), 'pathological:K' (integer K >= 1) or 'natural'"
# Datasets that carry a natural client id per training example (Dataset.groups).
NATURAL_DATASETS: tuple[str, ...] = ("shakespeare", "vader-sentiment")


@dataclass(frozen=True)
class PartitionSpec:
    """How to split: kind "iid" | "dirichlet" (param alpha) | "pathological" (param K) | "natural"."""

    kind: str
    param: float | int | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise DataError(f"unknown partition kind {self.kind!r}; use {FORMS}")
        if self.kind in ("iid", "natural") and self.param is not None:
            raise DataError(f"partition {self.kind!r} takes no parameter (got {self.param!r}); use {FORMS}")
        if self.kind == "dirichlet" and (
            isinstance(self.param, bool) or not isinstance(self.param, (int, float))
            or not np.isfinite(self.param) or self.param <= 0
        ):
            raise DataError(f"dirichlet alpha {self.param!r} is not allowed; use a number > 0, "
                            "e.g. dirichlet:0.5 (smaller alpha = more label skew)")
        if self.kind == "pathological" and (
            isinstance(self.param, bool) or not isinstance(self.param, (int, np.integer)) or self.param < 1
        ):
            raise DataError(f"pathological K {self.param!r} is not allowed; use an integer number of "
                            "classes per client >= 1, e.g. pathological:2")

    def __str__(self) -> str:
        return self.kind if self.param is None else f"{self.kind}:{self.param}"


def parse_partition(spec: str) -> PartitionSpec:
    """Read "iid", "dirichlet:ALPHA", "pathological:K" or "natural" (case and spaces ignored)."""
    if not isinstance(spec, str):
        raise DataError(f"partition {spec!r} is not a string; use {FORMS}")
    kind, sep, raw = spec.strip().lower().partition(":")
    kind, raw = kind.strip(), raw.strip()
    if kind not in KINDS:
        raise DataError(f"unknown partition {spec!r}; use {FORMS}")
    if kind in ("iid", "natural"):
        if sep:
            raise DataError(f"partition {spec!r}: {kind!r} takes no parameter; use {FORMS}")
        return PartitionSpec(kind)
    if kind == "dirichlet":
        try:
            alpha = float(raw)
        except ValueError:
            raise DataError(
                f"partition {spec!r}: alpha {raw!r} is not a number; use e.g. dirichlet:0.5"
            ) from None
        return PartitionSpec(kind, alpha)
    try:
        k = int(raw)
    except ValueError:
        raise DataError(f"partition {spec!r}: K {raw!r} is not an integer; use e.g. pathological:2") from None
    return PartitionSpec(kind, k)


def partition_indices(
    y: np.ndarray,
    spec: PartitionSpec | str,
    num_clients: int,
    seed: int,
    groups: np.ndarray | None = None,
) -> list[np.ndarray]:
    """Split range(len(y)) among num_clients: a sorted int64 index array per client, disjoint.

    iid, dirichlet and pathological cover every index and depend on seed. pathological uses Flower's
    "first-deterministic" class assignment (client i gets class i mod C first, the rest at random): every
    class is used when num_clients >= C or K = C, and a draw that leaves a class on no client is a
    DataError rather than silently dropped data. natural gives one client per distinct value of groups, in
    sorted id order (the num_clients largest groups when there are more; no seed involved).
    """
    spec = parse_partition(spec) if isinstance(spec, str) else spec
    y = np.asarray(y)
    if y.ndim != 1 or (len(y) and not np.issubdtype(y.dtype, np.integer)):
        raise DataError(f"labels have shape {y.shape} and dtype {y.dtype}; pass a 1-D integer label array")
    if isinstance(num_clients, bool) or not isinstance(num_clients, (int, np.integer)) or num_clients < 1:
        raise DataError(f"num_clients {num_clients!r} is not allowed; use an integer >= 1")
    if num_clients > len(y):
        raise DataError(f"num_clients {num_clients} is more than the {len(y)} training examples; "
                        f"use at most {len(y)} clients")
    if spec.kind == "natural":
        parts = _natural(groups, len(y), num_clients)
    else:
        parts = _by_label(y, spec, num_clients, seed)
    sizes = [len(p) for p in parts]
    if min(sizes) == 0:
        fix = "use fewer clients" + (" or a larger alpha" if spec.kind == "dirichlet" else "")
        raise DataError(f"partition {spec} over {num_clients} clients leaves client {sizes.index(0)} with no "
                        f"examples; {fix}")
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]


@functools.cache
def _table_class() -> type:
    """A Hugging Face Dataset whose select() skips fingerprint hashing.

    datasets dill-hashes the index list of every select() to name cache files; for the lists of numpy ints
    the label-skew partitioners pass, that costs seconds per 60k rows. These tables live in memory only
    and are never cached, so a random fingerprint is as good. Built on first use: importing datasets
    takes about 2 s, which `import client` should not pay.
    """
    from datasets import Dataset as HFDataset

    class IndexTable(HFDataset):
        def select(self, indices, *args, **kwargs):  # type: ignore[override]
            kwargs.setdefault("new_fingerprint", uuid.uuid4().hex)
            return super().select(indices, *args, **kwargs)

    return IndexTable


def _table(columns: dict[str, np.ndarray]):
    return _table_class().from_dict(columns)


def _read_idx(partitioner, num_parts: int) -> list[np.ndarray]:
    # The arrow view reads the column without materializing Python objects (numpy format is ~50x slower).
    return [partitioner.load_partition(i).with_format("arrow")["idx"].to_numpy() for i in range(num_parts)]


def _by_label(y: np.ndarray, spec: PartitionSpec, num_clients: int, seed: int) -> list[np.ndarray]:
    # Rows go in a seeded random order: IidPartitioner cuts contiguous shards and the label-skew
    # partitioners hand out each class's examples in row order, so the order is where the randomness is.
    order = np.random.default_rng(seed).permutation(len(y))
    if spec.kind == "iid":
        # IidPartitioner's contiguous shards (the first len % n shards one longer), cut here directly: going
        # through a Hugging Face table costs about 1 s per 100 clients; the shards are the same (tested).
        return np.array_split(order, num_clients)
    # Imported here: flwr_datasets imports matplotlib (and Hugging Face datasets), seconds an IID run saves.
    from flwr_datasets.partitioner import DirichletPartitioner, PathologicalPartitioner

    table = _table({"label": y[order], "idx": order})
    if spec.kind == "dirichlet":
        # self_balancing stops giving a client more examples once it holds an even share: the skew stays
        # in the labels and client sizes stay comparable, so per-client DP noise is not dominated by a few
        # tiny clients. min_partition_size=1: Flower redraws (up to 10 times) while a client is empty.
        partitioner = DirichletPartitioner(
            num_partitions=num_clients, partition_by="label", alpha=float(spec.param),
            min_partition_size=1, self_balancing=True, shuffle=False, seed=seed,
        )
        partitioner.dataset = table
        try:
            with warnings.catch_warnings():
                # Flower warns on every redraw; the final failure becomes one DataError below.
                warnings.simplefilter("ignore")
                return _read_idx(partitioner, num_clients)
        except ValueError:
            raise DataError(f"partition {spec} over {num_clients} clients leaves a client with no examples "
                            "after 10 draws; use fewer clients or a larger alpha") from None
    k = int(spec.param)
    classes = np.unique(y)
    if k > len(classes):
        raise DataError(f"partition {spec}: K = {k} is more than the {len(classes)} classes in the labels; "
                        f"use K <= {len(classes)}")
    partitioner = PathologicalPartitioner(
        num_partitions=num_clients, partition_by="label", num_classes_per_partition=k,
        class_assignment_mode="first-deterministic", shuffle=False, seed=seed,
    )
    partitioner.dataset = table
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "classes will NOT be used": checked and reported below
            parts = _read_idx(partitioner, num_clients)
    except ValueError:
        raise DataError(f"partition {spec} over {num_clients} clients needs more examples of some class than "
                        "there are; use fewer clients or a smaller K") from None
    used = np.unique(y[np.concatenate(parts)])
    unused = np.setdiff1d(classes, used)
    if len(unused):
        raise DataError(f"partition {spec} over {num_clients} clients (seed {seed}) gives classes "
                        f"{unused.tolist()} to no client; use at least {len(classes)} clients "
                        f"or K = {len(classes)}")
    return parts


def _natural(groups: np.ndarray | None, n: int, num_clients: int) -> list[np.ndarray]:
    from flwr_datasets.partitioner import NaturalIdPartitioner

    if groups is None:
        raise DataError(f"partition 'natural' needs a natural client id per example, which this dataset "
                        f"lacks; use it with {', '.join(NATURAL_DATASETS)}, or choose iid, dirichlet or "
                        "pathological")
    groups = np.asarray(groups)
    if groups.shape != (n,):
        raise DataError(f"groups has shape {groups.shape} for {n} labels; give one natural id per example")
    ids, counts = np.unique(groups, return_counts=True)
    if num_clients > len(ids):
        raise DataError(f"num_clients {num_clients} is more than the {len(ids)} natural clients of this "
                        f"dataset; use at most {len(ids)} clients with partition 'natural'")
    # The largest groups win; among equal sizes the smaller id (ids are sorted, and the sort is stable).
    chosen = ids[np.argsort(-counts, kind="stable")[:num_clients]]
    rows = np.flatnonzero(np.isin(groups, chosen))
    table = _table({"group": groups[rows], "idx": rows})
    partitioner = NaturalIdPartitioner(partition_by="group")
    partitioner.dataset = table
    # NaturalIdPartitioner draws a tqdm progress bar on stderr while it groups rows; keep the CLI quiet.
    with contextlib.redirect_stderr(io.StringIO()):
        return _read_idx(partitioner, partitioner.num_partitions)


def holdout_split(indices: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, held-out): a seeded random `fraction` of indices held out, both sorted int64.

    With fraction > 0 and at least two indices, each side gets at least one index, so a small client
    still has something to validate on and something to train on.
    """
    indices = np.asarray(indices)
    if indices.ndim != 1 or (len(indices) and not np.issubdtype(indices.dtype, np.integer)):
        raise DataError(
            f"indices have shape {indices.shape} and dtype {indices.dtype}; pass a 1-D integer array"
        )
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 <= fraction < 1.0:
        raise DataError(f"holdout fraction {fraction!r} is not allowed; use a number in [0, 1), e.g. 0.1")
    n = len(indices)
    held = int(round(fraction * n))
    if fraction > 0 and n >= 2:
        held = min(max(held, 1), n - 1)
    shuffled = indices[np.random.default_rng(seed).permutation(n)].astype(np.int64)
    return np.sort(shuffled[held:]), np.sort(shuffled[:held])
