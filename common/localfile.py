"""A data owner's own examples from one file (.npz or .csv), for deployment where nobody partitions data."""

from __future__ import annotations

import csv
import zipfile
from pathlib import Path

import numpy as np

from common.datasets import DataError

SUFFIXES = (".npz", ".csv")


def load_local_file(path: str | Path, label_column: str = "label") -> tuple[np.ndarray, np.ndarray]:
    """(x float32 of shape (N, ...), y int64 of shape (N,)) from a .npz or .csv file.

    .npz: arrays `x` (any per-example shape) and `y` (integer labels).
    .csv: a header row; `label_column` holds integer labels, every other column is a numeric feature.
    """
    path = Path(path)
    if path.suffix.lower() not in SUFFIXES:
        raise DataError(f"{path}: unknown file type {path.suffix or '(none)'!r}; use a .npz (arrays x, y) "
                        f"or a .csv with a header row and a {label_column!r} column")
    if not path.is_file():
        raise DataError(f"{path}: no such file; check the path given to the client")
    x, y = _read_npz(path) if path.suffix.lower() == ".npz" else _read_csv(path, label_column)
    if len(y) == 0:
        raise DataError(f"{path}: the file holds no examples; give it at least one labelled example")
    if len(x) != len(y):
        raise DataError(f"{path}: {len(x)} examples but {len(y)} labels; give exactly one label per example")
    return x, y


def _labels(values: np.ndarray, path: Path, what: str) -> np.ndarray:
    """Integer class ids, accepting floats that are whole numbers (CSV and pandas often write 3.0)."""
    try:
        as_float = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError):
        raise DataError(f"{path}: {what} are not numeric; labels must be integer class ids 0..K-1") from None
    if as_float.ndim != 1:
        raise DataError(
            f"{path}: {what} have shape {as_float.shape}; give one integer label per example, shape (N,)"
        )
    if not np.all(np.isfinite(as_float)) or np.any(as_float != np.round(as_float)):
        raise DataError(f"{path}: {what} include non-integer values; labels must be integer class ids 0..K-1")
    if np.any(as_float < 0):
        raise DataError(f"{path}: {what} include negative values; labels must be integer class ids 0..K-1")
    return as_float.astype(np.int64)


def _read_npz(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        # allow_pickle=False: a data file must never run code when it is opened.
        with np.load(path, allow_pickle=False) as archive:
            missing = [name for name in ("x", "y") if name not in archive.files]
            if missing:
                found = ", ".join(archive.files) or "none"
                raise DataError(f"{path}: missing array(s) {', '.join(missing)} (found: {found}); "
                                "save with np.savez(path, x=..., y=...)")
            x_raw, y_raw = archive["x"], archive["y"]
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        if isinstance(exc, DataError):
            raise
        raise DataError(
            f"{path}: not a readable .npz file ({exc}); save with np.savez(path, x=..., y=...)"
        ) from None
    try:
        x = np.asarray(x_raw, dtype=np.float32)
    except (TypeError, ValueError):
        raise DataError(f"{path}: array x has dtype {x_raw.dtype}, not numeric; store numbers in x") from None
    if x.ndim < 1:
        raise DataError(f"{path}: array x is a scalar; give x the shape (N, ...) with one row per example")
    if not np.all(np.isfinite(x)):
        raise DataError(f"{path}: array x holds NaN or infinite values; clean or impute them first")
    return x, _labels(y_raw, path, "labels in array y")


def _read_csv(path: Path, label_column: str) -> tuple[np.ndarray, np.ndarray]:
    with path.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.reader(handle))
    rows = [row for row in rows if any(cell.strip() for cell in row)]
    if not rows:
        raise DataError(f"{path}: the file is empty; give a header row and at least one labelled example")
    header = [name.strip() for name in rows[0]]
    if label_column not in header:
        raise DataError(f"{path}: no {label_column!r} column (columns: {', '.join(header)}); "
                        f"add it or name the label column")
    if len(header) < 2:
        raise DataError(f"{path}: only the {label_column!r} column; add at least one feature column")
    body = rows[1:]
    for line, row in enumerate(body, start=2):
        if len(row) != len(header):
            raise DataError(f"{path}: line {line} has {len(row)} fields, the header has {len(header)}; "
                            "fix that row")
    label_at = header.index(label_column)
    features = [i for i in range(len(header)) if i != label_at]
    try:
        table = np.array([[float(cell) for cell in row] for row in body], dtype=np.float64)
        table = table.reshape(-1, len(header))
    except ValueError:
        bad_line, bad_col, bad = next(
            (line, header[i], cell) for line, row in enumerate(body, start=2) for i, cell in enumerate(row)
            if not _is_number(cell)
        )
        raise DataError(f"{path}: line {bad_line}, column {bad_col!r} holds {bad!r}, not a number; "
                        "every feature and label must be numeric") from None
    x = table[:, features].astype(np.float32)
    if not np.all(np.isfinite(x)):
        raise DataError(f"{path}: features hold NaN or infinite values; clean or impute them first")
    return x, _labels(table[:, label_at], path, f"values of column {label_column!r}")


def _is_number(cell: str) -> bool:
    try:
        float(cell)
    except ValueError:
        return False
    return True
