"""Partitioning a training set among clients (common.partitions)."""

from __future__ import annotations

import time

import numpy as np
import pytest

from common.datasets import DataError, load_dataset
from common.partitions import PartitionSpec, holdout_split, parse_partition, partition_indices


@pytest.fixture(scope="module")
def digits_y() -> np.ndarray:
    return np.asarray(load_dataset("digits").y_train)


def mean_label_entropy(y: np.ndarray, parts: list[np.ndarray]) -> float:
    entropies = []
    for part in parts:
        p = np.bincount(y[part]) / len(part)
        p = p[p > 0]
        entropies.append(float(-(p * np.log(p)).sum()))
    return float(np.mean(entropies))


# ---------------------------------------------------------------- parsing


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("iid", PartitionSpec("iid")),
        (" Natural ", PartitionSpec("natural")),
        ("dirichlet:0.1", PartitionSpec("dirichlet", 0.1)),
        ("dirichlet: 2", PartitionSpec("dirichlet", 2.0)),
        ("pathological:3", PartitionSpec("pathological", 3)),
    ],
)
def test_parse_partition_forms(text: str, expected: PartitionSpec) -> None:
    assert parse_partition(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("shards", r"unknown partition 'shards'; use 'iid', 'dirichlet:ALPHA' \(ALPHA > 0\), 'pathologi"),
        ("dirichlet", r"partition 'dirichlet': alpha '' is not a number"),
        ("dirichlet:abc", r"alpha 'abc' is not a number; use e\.g\. dirichlet:0\.5"),
        ("dirichlet:0", r"dirichlet alpha 0\.0 is not allowed; use a number > 0"),
        ("dirichlet:-1", r"dirichlet alpha -1\.0 is not allowed"),
        ("dirichlet:inf", r"dirichlet alpha inf is not allowed"),
        ("pathological:0", r"pathological K 0 is not allowed; use an integer number of classes per client"),
        ("pathological:1.5", r"K '1\.5' is not an integer; use e\.g\. pathological:2"),
        ("iid:3", r"'iid' takes no parameter"),
    ],
)
def test_parse_partition_errors(text: str, message: str) -> None:
    with pytest.raises(DataError, match=message) as err:
        parse_partition(text)
    assert "\n" not in str(err.value)


def test_partition_spec_validates_at_construction() -> None:
    with pytest.raises(DataError, match="dirichlet alpha -0.5 is not allowed"):
        PartitionSpec("dirichlet", -0.5)
    with pytest.raises(DataError, match="unknown partition kind 'zipf'"):
        PartitionSpec("zipf")
    assert str(PartitionSpec("pathological", 2)) == "pathological:2"


# ---------------------------------------------------------------- label-based kinds


@pytest.mark.parametrize("spec", ["iid", "dirichlet:0.5", "pathological:2"])
def test_partition_is_a_seeded_disjoint_cover(digits_y: np.ndarray, spec: str) -> None:
    parts = partition_indices(digits_y, spec, 10, seed=1)
    assert len(parts) == 10
    assert all(p.dtype == np.int64 and np.all(np.diff(p) > 0) and len(p) > 0 for p in parts)
    everything = np.concatenate(parts)
    assert len(everything) == len(digits_y)  # disjoint ...
    np.testing.assert_array_equal(np.sort(everything), np.arange(len(digits_y)))  # ... and covering
    again = partition_indices(digits_y, parse_partition(spec), 10, seed=1)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))
    other = partition_indices(digits_y, spec, 10, seed=2)
    assert not all(np.array_equal(a, b) for a, b in zip(parts, other, strict=True))


def test_iid_parts_are_balanced_and_mixed(digits_y: np.ndarray) -> None:
    parts = partition_indices(digits_y, "iid", 10, seed=0)
    assert {len(p) for p in parts} <= {143, 144}
    assert all(len(np.unique(digits_y[p])) == 10 for p in parts)


def test_dirichlet_small_alpha_is_more_skewed_than_iid(digits_y: np.ndarray) -> None:
    iid = mean_label_entropy(digits_y, partition_indices(digits_y, "iid", 10, seed=0))
    skewed = mean_label_entropy(digits_y, partition_indices(digits_y, "dirichlet:0.1", 10, seed=0))
    mild = mean_label_entropy(digits_y, partition_indices(digits_y, "dirichlet:100", 10, seed=0))
    assert iid > 2.2  # log(10) = 2.30 for perfectly mixed clients
    assert skewed < iid - 0.8
    assert mild > skewed + 0.8


def test_pathological_gives_each_client_k_classes(digits_y: np.ndarray) -> None:
    parts = partition_indices(digits_y, "pathological:2", 10, seed=0)
    assert all(len(np.unique(digits_y[p])) == 2 for p in parts)
    parts = partition_indices(digits_y, "pathological:1", 20, seed=0)
    assert all(len(np.unique(digits_y[p])) == 1 for p in parts)


def test_dirichlet_on_60k_labels_and_50_clients_is_fast() -> None:
    y = np.repeat(np.arange(10), 6000)
    start = time.perf_counter()
    parts = partition_indices(y, "dirichlet:0.3", 50, seed=0)
    elapsed = time.perf_counter() - start
    assert sum(len(p) for p in parts) == 60000
    assert elapsed < 5.0, f"dirichlet over 60k labels took {elapsed:.1f} s"


# ---------------------------------------------------------------- natural ids


def test_natural_on_shakespeare_follows_groups() -> None:
    ds = load_dataset("shakespeare")
    parts = partition_indices(ds.y_train, "natural", 20, seed=0, groups=ds.groups)
    assert len(parts) == 20
    owners = [np.unique(ds.groups[p]) for p in parts]
    assert all(len(o) == 1 for o in owners)  # a client holds exactly one role ...
    owners = [str(o[0]) for o in owners]
    assert len(set(owners)) == 20 and owners == sorted(owners)  # ... each a different one, in id order
    ids, inverse, counts = np.unique(ds.groups, return_inverse=True, return_counts=True)
    for part, owner in zip(parts, owners, strict=True):  # ... and all of that role's windows
        np.testing.assert_array_equal(part, np.flatnonzero(inverse == np.searchsorted(ids, owner)))
    # The 20 largest roles were chosen.
    assert min(len(p) for p in parts) >= np.sort(counts)[-20]
    assert "hamlet/HAMLET" in owners


def test_natural_picks_largest_groups_and_breaks_ties_by_id() -> None:
    groups = np.array(["c", "c", "a", "a", "b", "b", "d", "e", "e", "e"])
    y = np.zeros(len(groups), dtype=np.int64)
    parts = partition_indices(y, "natural", 3, seed=0, groups=groups)
    assert [p.tolist() for p in parts] == [[2, 3], [4, 5], [7, 8, 9]]  # e (3), then a and b beat c on id
    everything = partition_indices(y, "natural", 5, seed=7, groups=groups)
    assert [groups[p[0]] for p in everything] == ["a", "b", "c", "d", "e"]
    int_groups = np.array([5, 5, 2, 9, 9, 9])
    parts = partition_indices(np.zeros(6, dtype=np.int64), "natural", 2, seed=0, groups=int_groups)
    assert [p.tolist() for p in parts] == [[0, 1], [3, 4, 5]]


# ---------------------------------------------------------------- errors


def test_partition_errors(digits_y: np.ndarray) -> None:
    cases = [
        (dict(spec="pathological:11", num_clients=10),
         r"pathological:11: K = 11 is more than the 10 classes in the labels; use K <= 10"),
        (dict(spec="iid", num_clients=0), r"num_clients 0 is not allowed; use an integer >= 1"),
        (dict(spec="iid", num_clients=1438), r"num_clients 1438 is more than the 1437 training examples"),
        (dict(spec="natural", num_clients=2),
         r"'natural' needs a natural client id per example.*use it with shakespeare"),
        (dict(spec="pathological:1", num_clients=4),
         r"pathological:1 over 4 clients \(seed 0\) gives classes \[4, 5, 6, 7, 8, 9\] to no client; "
         r"use at least 10 clients or K = 10"),
    ]
    for kwargs, message in cases:
        with pytest.raises(DataError, match=message) as err:
            partition_indices(digits_y, kwargs["spec"], kwargs["num_clients"], seed=0)
        assert "\n" not in str(err.value)


def test_dirichlet_that_leaves_a_client_empty_says_what_to_change() -> None:
    y = np.repeat(np.arange(3), 5)
    with pytest.raises(DataError, match=r"dirichlet:0.01 over 14 clients leaves a client with no examples.*"
                                        r"use fewer clients or a larger alpha"):
        partition_indices(y, "dirichlet:0.01", 14, seed=0)


def test_natural_with_more_clients_than_groups() -> None:
    groups = np.array(["a", "a", "b"])
    with pytest.raises(DataError, match=r"num_clients 3 is more than the 2 natural clients of this dataset"):
        partition_indices(np.zeros(3, dtype=np.int64), "natural", 3, seed=0, groups=groups)


# ---------------------------------------------------------------- holdout


def test_holdout_split_is_a_seeded_disjoint_split() -> None:
    indices = np.arange(100, 200)
    train, held = holdout_split(indices, 0.2, seed=3)
    assert len(held) == 20 and len(train) == 80
    np.testing.assert_array_equal(np.sort(np.concatenate([train, held])), indices)
    assert train.dtype == held.dtype == np.int64 and np.all(np.diff(held) > 0)
    again = holdout_split(indices, 0.2, seed=3)
    assert np.array_equal(again[1], held)
    assert not np.array_equal(holdout_split(indices, 0.2, seed=4)[1], held)


def test_holdout_split_edges() -> None:
    train, held = holdout_split(np.array([7, 3]), 0.1, seed=0)  # round(0.2) = 0, but both sides get one
    assert len(train) == 1 and len(held) == 1
    train, held = holdout_split(np.array([7]), 0.5, seed=0)
    assert train.tolist() == [7] and held.tolist() == []
    train, held = holdout_split(np.arange(10), 0.0, seed=0)
    assert train.tolist() == list(range(10)) and len(held) == 0
    for bad in (1.0, -0.1):
        with pytest.raises(DataError, match=rf"holdout fraction {bad} is not allowed; use a number in \["):
            holdout_split(np.arange(10), bad, seed=0)
