"""Smaller copies of a dataset, so a whole comparison grid fits in minutes on a small machine.

No run-config key caps the number of examples, so the cap is applied to the data itself: Fashion-MNIST is
read from the IDX folder named by `data-dir`, and a seeded, class-stratified subset is written as a new IDX
folder that every cell of a grid then names as its `data-dir`. Partitioning, training and the server's test
set all go through the unchanged code path; only the files are smaller.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from common import ConfigError, load_dataset

# Datasets whose loader reads a folder named by `data-dir`, so a smaller copy can stand in for them.
SUBSETTABLE = ("fashion-mnist",)
# The subset is the same for every seed of a grid: seeds vary the partition, initialisation and batch order,
# not which examples exist, so cells with different seeds stay comparable.
SUBSET_SEED = 0


def subset_data_dir(dataset: str, data_dir: str, max_train: int, max_test: int, root: Path) -> str:
    """A folder holding at most max_train training and max_test test examples of `dataset` (0 = all);
    written once under `root` and reused. Returns the folder, to be used as the run config's `data-dir`."""
    if dataset not in SUBSETTABLE:
        raise ConfigError(f"max-train-examples / max-test-examples cannot shrink dataset {dataset!r} (no "
                          f"run-config key caps examples; only {', '.join(SUBSETTABLE)} is read from a "
                          "data-dir); set both to 0 for this dataset")
    ds = load_dataset(dataset, data_dir or None)
    n_train = _capped(max_train, len(ds.y_train), "max-train-examples")
    n_test = _capped(max_test, len(ds.y_test), "max-test-examples")
    folder = root / f"{dataset}-train{n_train}-test{n_test}-seed{SUBSET_SEED}"
    if folder.is_dir():
        return str(folder)
    train_idx = _stratified(ds.y_train, n_train)
    test_idx = _stratified(ds.y_test, n_test)
    tmp = folder.with_name(f".{folder.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for prefix, x, y in (("train", ds.x_train[train_idx], ds.y_train[train_idx]),
                         ("t10k", ds.x_test[test_idx], ds.y_test[test_idx])):
        _write_idx(tmp / f"{prefix}-images-idx3-ubyte", 2051, _as_pixels(x, ds.x_train))
        _write_idx(tmp / f"{prefix}-labels-idx1-ubyte", 2049, y.astype(np.uint8))
    # The copy must load to exactly the chosen examples, or every number of the grid would be off.
    copy = load_dataset(dataset, str(tmp))
    pairs = ((copy.x_train, ds.x_train[train_idx]), (copy.y_train, ds.y_train[train_idx]),
             (copy.x_test, ds.x_test[test_idx]), (copy.y_test, ds.y_test[test_idx]))
    if not all(np.array_equal(a, b) for a, b in pairs):
        shutil.rmtree(tmp, ignore_errors=True)
        raise ConfigError(f"the {dataset} subset written to {tmp} does not load back to the same examples; "
                          "set max-train-examples = 0 and max-test-examples = 0 to use the whole dataset")
    tmp.rename(folder)
    return str(folder)


def _capped(cap: int, available: int, key: str) -> int:
    if cap < 0:
        raise ConfigError(f"{key} = {cap} is out of range; use 0 (all examples) or a number >= 1")
    return available if cap == 0 or cap >= available else cap


def _stratified(y: np.ndarray, n: int) -> np.ndarray:
    """n indices with the class mix of y (scikit-learn's stratified split), sorted."""
    if n >= len(y):
        return np.arange(len(y))
    from sklearn.model_selection import train_test_split

    idx, _ = train_test_split(np.arange(len(y)), train_size=n, stratify=y, random_state=SUBSET_SEED)
    return np.sort(idx)


def _as_pixels(x: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Back to the uint8 pixels the IDX format holds. The loader maps pixel p to an affine a*p + b, so pixel 0
    is the smallest and 255 the largest value of the (whole) training set; the round trip is checked above."""
    lo, hi = float(reference.min()), float(reference.max())
    pixels = np.rint((x.astype(np.float64) - lo) * (255.0 / (hi - lo)))
    return np.clip(pixels, 0, 255).astype(np.uint8).reshape(len(x), 28, 28)


def _write_idx(path: Path, magic: int, array: np.ndarray) -> None:
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    path.write_bytes(header + np.ascontiguousarray(array).tobytes())
