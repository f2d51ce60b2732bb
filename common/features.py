"""Fixed feature stages (e.g. a scattering transform) computed once per dataset and cached.

A model built as `features` + `head` (models.scatter.StagedModel) trains only its head: the client turns its
examples into features once, and every round trains on those. The transform is fixed and data-independent, so
this costs no privacy. Computing it is slow (about 7 ms an image here for Scattering2D J=2 on 28x28), hence
two caches:

- in memory, per process: a simulated ClientApp is rebuilt for every message, its features must not be;
- on disk, one file per (data, transform): `<cache dir>/<transform key>/<key>.npy`, where the key hashes the
  exact input bytes, their shape and dtype, and the transform's own key (library version and settings). A
  changed dataset or transform gives another key, so a stale file is never found under the new key. Beside it,
  `<key>.rows.npy` holds a digest of each example, and `<key>.sha256` the digests of both files; a file that
  does not match them, cannot be read, or has the wrong shape is computed anew and rewritten, never trained on.
  The row digests let another partitioning of the same dataset (Dirichlet after IID, one client after ten)
  copy the rows already transformed instead of transforming them again.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import secrets
from collections import OrderedDict
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from common.config import ConfigError
from common.task import ClientData
from common.training import as_tensor
from models import TaskSpec, split_stages
from privacy.files import write_atomic

FORMAT = "fedpriv-features-1"  # part of every key: bump it when the file layout changes
CHUNK = 256  # images per transform call: larger chunks are slower here (memory traffic)
# Enough for one simulated federation in a process: 10 clients' train and held-out splits and the test set.
MEMORY_ENTRIES = 24

_memory: OrderedDict[str, np.ndarray] = OrderedDict()


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "fedpriv" / "features"


def resolve_cache_dir(configured: str) -> Path:
    """`feature-cache-dir` from the run config; "" means the user's cache folder."""
    return Path(configured).expanduser().resolve() if configured else default_cache_dir()


def check_cache_dir(configured: str) -> Path:
    """Fail now, before training, if the features cannot be cached where configured."""
    folder = resolve_cache_dir(configured)
    probe = folder / f".probe.{os.getpid()}.{secrets.token_hex(4)}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise ConfigError(f"feature-cache-dir {str(folder)!r} is not writable ({reason}); set feature-cache-dir "
                          "to a folder you can write, or '' for ~/.cache/fedpriv/features") from None
    return folder


def cache_key(x: np.ndarray, transform_key: str) -> str:
    digest = hashlib.sha256()
    for part in (FORMAT, transform_key, str(x.dtype), str(x.shape)):
        digest.update(part.encode() + b"\0")
    digest.update(np.ascontiguousarray(x).data)
    return digest.hexdigest()[:32]


def compute_features(stage: nn.Module, x: np.ndarray) -> np.ndarray:
    xt = as_tensor(x)
    with torch.no_grad():
        parts = [stage(xt[i : i + CHUNK]).numpy() for i in range(0, len(xt), CHUNK)]
    if not parts:
        return np.zeros((0, *stage.output_shape), dtype=np.float32)
    return np.concatenate(parts).astype(np.float32, copy=False)


def row_digests(x: np.ndarray) -> np.ndarray:
    """One 16-byte digest per example, so that an example seen before (in another partition of the same
    dataset, say) is looked up instead of transformed again."""
    # Explicit sizes, no -1: numpy cannot infer a size from an empty array (a client with no held-out rows).
    rows = np.ascontiguousarray(x).reshape(len(x), math.prod(x.shape[1:])).view(np.uint8)
    return np.array([hashlib.blake2b(row.data, digest_size=16).digest() for row in rows], dtype="S16")


def _encode(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def _read(path: Path, expected_shape: tuple[int, ...] | None) -> tuple[np.ndarray, np.ndarray] | None:
    """(features, row digests) from the cache, or None if missing, corrupt or not what the key promises."""
    rows_path, digest_path = path.with_suffix(".rows.npy"), path.with_suffix(".sha256")
    try:
        payload, rows_payload = path.read_bytes(), rows_path.read_bytes()
        expected = digest_path.read_text().split()
    except OSError:
        return None
    if expected != [hashlib.sha256(payload).hexdigest(), hashlib.sha256(rows_payload).hexdigest()]:
        return None
    try:
        array = np.load(io.BytesIO(payload), allow_pickle=False)
        rows = np.load(io.BytesIO(rows_payload), allow_pickle=False)
    except (ValueError, OSError, EOFError):
        return None
    if expected_shape is not None and array.shape != expected_shape:
        return None
    if array.dtype != np.float32 or rows.dtype != np.dtype("S16") or rows.shape != (len(array),):
        return None
    return array, rows


def _write(path: Path, array: np.ndarray, rows: np.ndarray) -> None:
    payload, rows_payload = _encode(array), _encode(rows)
    # The data first, the digests last: a crash in between leaves files that the digest check rejects.
    write_atomic(path, payload)
    write_atomic(path.with_suffix(".rows.npy"), rows_payload)
    digests = f"{hashlib.sha256(payload).hexdigest()}\n{hashlib.sha256(rows_payload).hexdigest()}\n"
    write_atomic(path.with_suffix(".sha256"), digests)


def _from_banks(folder: Path, rows: np.ndarray, out: np.ndarray) -> np.ndarray:
    """Fill `out` with the features of rows found in valid cache files of the same transform; returns a mask
    of the rows found. Corrupt files are skipped (their digests do not match), never used."""
    found = np.zeros(len(rows), dtype=bool)
    wanted = {digest: i for i, digest in enumerate(rows.tolist())}
    for bank_path in sorted(folder.glob("*.rows.npy")):
        if found.all():
            break
        bank = _read(bank_path.with_suffix("").with_suffix(".npy"), None)
        if bank is None or bank[0].shape[1:] != out.shape[1:]:
            continue
        for j, digest in enumerate(bank[1].tolist()):
            i = wanted.get(digest)
            if i is not None and not found[i]:
                out[i] = bank[0][j]
                found[i] = True
    return found


def cached_features(stage: nn.Module, x: np.ndarray, cache_dir: Path) -> np.ndarray:
    """stage(x), from memory, else from a valid file in cache_dir, else assembled from the rows already
    transformed in other files of this transform and computed for the rest (then cached)."""
    key = cache_key(x, stage.cache_key)
    if key in _memory:
        _memory.move_to_end(key)
        return _memory[key]
    folder = cache_dir / stage.cache_key
    path = folder / f"{key}.npy"
    cached = _read(path, (len(x), *stage.output_shape))
    if cached is not None:
        array = cached[0]
    else:
        rows = row_digests(x)
        array = np.zeros((len(x), *stage.output_shape), dtype=np.float32)
        found = _from_banks(folder, rows, array) if folder.is_dir() else np.zeros(len(x), dtype=bool)
        if not found.all():
            array[~found] = compute_features(stage, x[~found])
        _write(path, array, rows)
    array.flags.writeable = False  # shared by every caller in this process, like the datasets
    _memory[key] = array
    while len(_memory) > MEMORY_ENTRIES:
        _memory.popitem(last=False)
    return array


def staged(model: nn.Module, data: ClientData, cache_dir: Path | str) -> tuple[nn.Module, ClientData]:
    """(the module to train and send, the data it sees). A plain model comes back as it is, with its data;
    a staged model gives its head, and the client's data turned into (cached) features. `cache_dir`: a folder,
    or the run config's `feature-cache-dir` text, resolved only for a staged model (a path resolution on every
    message was 3 ms of a 0.17 s round at 100 messages)."""
    stage, head = split_stages(model)
    if stage is None:
        return model, data
    cache_dir = resolve_cache_dir(cache_dir) if isinstance(cache_dir, str) else cache_dir
    spec = TaskSpec(tuple(stage.output_shape), data.spec.num_classes)
    return head, replace(data, x_train=cached_features(stage, data.x_train, cache_dir),
                         x_val=cached_features(stage, data.x_val, cache_dir), spec=spec)


def staged_test(model: nn.Module, x_test: np.ndarray, cache_dir: Path) -> tuple[nn.Module, np.ndarray]:
    """The server's side of `staged`: (module whose weights the federation averages, the test inputs it sees)."""
    stage, head = split_stages(model)
    if stage is None:
        return model, x_test
    return head, cached_features(stage, x_test, cache_dir)
