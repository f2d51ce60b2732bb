"""Fixed feature stages (e.g. a scattering transform) computed once per dataset and cached.

A model built as `features` + `head` (models.scatter.StagedModel) trains only its head: the client turns its
examples into features once, and every round trains on those. The transform is fixed and data-independent, so
this costs no privacy. Computing it is slow (about 7 ms an image here for Scattering2D J=2 on 28x28), hence
two caches:

- in memory, per process: a simulated ClientApp is rebuilt for every message, its features must not be;
- on disk, one file per (data, transform): `<cache dir>/<key>.npy`, where the key hashes the exact input bytes,
  their shape and dtype, and the transform's own cache key (library version and settings). A changed dataset
  or transform gives another key, so a stale file is never found under the new key. Beside it a
  `<key>.sha256` holds the digest of the file; a file that does not match it, cannot be read, or has the
  wrong shape is computed anew and rewritten, never trained on.
"""

from __future__ import annotations

import hashlib
import io
import os
import secrets
from collections import OrderedDict
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from client.config import ConfigError
from client.task import ClientData
from client.training import as_tensor
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


def _read(path: Path, expected_shape: tuple[int, ...]) -> np.ndarray | None:
    """The cached array, or None if it is missing, corrupt or not what the key promises."""
    digest_path = path.with_suffix(".sha256")
    try:
        payload = path.read_bytes()
        expected = digest_path.read_text().strip()
    except OSError:
        return None
    if hashlib.sha256(payload).hexdigest() != expected:
        return None
    try:
        array = np.load(io.BytesIO(payload), allow_pickle=False)
    except (ValueError, OSError, EOFError):
        return None
    if array.shape != expected_shape or array.dtype != np.float32:
        return None
    return array


def _write(path: Path, array: np.ndarray) -> None:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    payload = buffer.getvalue()
    # The array first, its digest last: a crash in between leaves a file the digest check rejects.
    write_atomic(path, payload)
    write_atomic(path.with_suffix(".sha256"), hashlib.sha256(payload).hexdigest() + "\n")


def cached_features(stage: nn.Module, x: np.ndarray, cache_dir: Path) -> np.ndarray:
    """stage(x), from memory, else from a valid file in cache_dir, else computed (and then cached)."""
    key = cache_key(x, stage.cache_key)
    if key in _memory:
        _memory.move_to_end(key)
        return _memory[key]
    path = cache_dir / f"{key}.npy"
    expected_shape = (len(x), *stage.output_shape)
    array = _read(path, expected_shape)
    if array is None:
        array = compute_features(stage, x)
        _write(path, array)
    array.flags.writeable = False  # shared by every caller in this process, like the datasets
    _memory[key] = array
    while len(_memory) > MEMORY_ENTRIES:
        _memory.popitem(last=False)
    return array


def staged(model: nn.Module, data: ClientData, cache_dir: Path) -> tuple[nn.Module, ClientData]:
    """(the module to train and send, the data it sees). A plain model comes back as it is, with its data;
    a staged model gives its head, and the client's data turned into (cached) features."""
    stage, head = split_stages(model)
    if stage is None:
        return model, data
    spec = TaskSpec(tuple(stage.output_shape), data.spec.num_classes)
    return head, replace(data, x_train=cached_features(stage, data.x_train, cache_dir),
                         x_val=cached_features(stage, data.x_val, cache_dir), spec=spec)


def staged_test(model: nn.Module, x_test: np.ndarray, cache_dir: Path) -> tuple[nn.Module, np.ndarray]:
    """The server's side of `staged`: (module whose weights the federation averages, the test inputs it sees)."""
    stage, head = split_stages(model)
    if stage is None:
        return model, x_test
    return head, cached_features(stage, x_test, cache_dir)
