"""Compressed client updates: `compress = none | int8 | topk:FRACTION`.

A client sends the change it made to the global model (its delta), not its full weights:
- int8: each tensor's delta as int8 with one float32 scale (max |delta| / 127), about 4x fewer bytes;
- topk:F: the F largest-magnitude entries of each tensor's delta (int32 index + float32 value each, so top-k 1%
  costs about 2% of the float32 bytes). What is left out is not lost: it is kept in the client's
  `context.state` and added to the next delta it sends (error feedback, Seide et al. 2014; Stich et al. 2018),
  so every coordinate eventually reaches the server.
The server decodes every update back to full weights (global + delta) before its checks and aggregation, so
any strategy that averages weights works unchanged; robust aggregators (Krum, median, trimmed mean) compare
whole updates, which sparse or quantized deltas distort, so they are refused before training.

Compression runs as the outermost client mod: it sees the update after DP-SGD or local DP noise, so it is
post-processing of a private output and costs no privacy (Dwork & Roth 2014, Prop. 2.1). The error-feedback
residual is built from the same private outputs only, so it is post-processing too.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord

from common.arrays import as_numpy, record_bytes
from common.config import ConfigError
from common.messages import get_record

METHODS = ("none", "int8", "topk")
# Strategies whose aggregate is a (weighted) average of the clients' weights, possibly followed by a server
# optimizer step: a decoded compressed update is just another update to them.
AVERAGING_STRATEGIES = ("fedavg", "fedavgm", "fedprox", "fedadam", "fedyogi", "fedadagrad")

PAYLOAD = "compressed"  # the reply's ArrayRecord that replaces "arrays"
HEADER = "compression"  # the reply's ConfigRecord naming the codec
RESIDUAL = "compress-residual"  # context.state key of the top-k error-feedback memory
SEP = "::"  # payload keys are PARAM::PART


class CompressionError(ValueError):
    """A compressed update that cannot be decoded against the global model."""


@dataclass(frozen=True)
class CompressionConfig:
    """How a client encodes its update. `fraction` is top-k's share of entries kept per tensor."""

    method: str = "none"
    fraction: float = 1.0

    DEFAULTS: ClassVar[dict[str, Any]] = {"compress": "none"}

    @classmethod
    def parse(cls, text: str) -> CompressionConfig:
        spec = str(text).strip().lower()
        method, _, arg = spec.partition(":")
        if method in ("none", "int8") and not arg:
            return cls(method)
        if method == "topk":
            try:
                fraction = float(arg)
            except ValueError:
                raise ConfigError(f"compress = {text!r}: top-k needs a fraction, e.g. topk:0.01") from None
            if not (math.isfinite(fraction) and 0.0 < fraction <= 1.0):
                raise ConfigError(f"compress = {text!r}: the top-k fraction {fraction:g} is out of range; "
                                  "it must be in (0, 1], e.g. topk:0.01 keeps 1% of each tensor")
            return cls("topk", fraction)
        raise ConfigError(f"compress = {text!r} is not a codec; use none, int8 or topk:FRACTION (e.g. topk:0.01)")

    @classmethod
    def from_run_config(cls, rc: Mapping[str, Any]) -> CompressionConfig:
        return cls.parse(rc.get("compress", cls.DEFAULTS["compress"]))

    @property
    def enabled(self) -> bool:
        return self.method != "none"

    def check_strategy(self, strategy: str) -> None:
        if self.enabled and strategy not in AVERAGING_STRATEGIES:
            raise ConfigError(f"compress = {self.method} needs a strategy that averages updates; {strategy!r} "
                              f"compares whole updates: use one of {', '.join(AVERAGING_STRATEGIES)} or compress=none")


def _is_float(a: np.ndarray) -> bool:
    return np.issubdtype(a.dtype, np.floating)


def payload_bytes(arrays: Mapping[str, np.ndarray]) -> int:
    """Bytes of tensor data sent (Flower's per-array framing, a few dozen bytes each, is not counted)."""
    return int(sum(a.nbytes for a in arrays.values()))


def encode(reference: Mapping[str, np.ndarray], weights: Mapping[str, np.ndarray], cfg: CompressionConfig,
           residual: Mapping[str, np.ndarray] | None = None) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(payload, new residual) for the update `weights` of the global model `reference`.
    Non-float tensors (counters) are sent as they are."""
    payload: dict[str, np.ndarray] = {}
    new_residual: dict[str, np.ndarray] = {}
    for name, w in weights.items():
        if not _is_float(w):
            payload[f"{name}{SEP}raw"] = np.asarray(w)
            continue
        delta = np.asarray(w, np.float32) - np.asarray(reference[name], np.float32)
        if cfg.method == "int8":
            peak = float(np.abs(delta).max()) if delta.size else 0.0
            scale = peak / 127.0 if peak > 0 else 1.0
            payload[f"{name}{SEP}q"] = np.clip(np.rint(delta / scale), -127, 127).astype(np.int8)
            payload[f"{name}{SEP}scale"] = np.array([scale], np.float32)
        elif cfg.method == "topk":
            if residual is not None and name in residual and residual[name].shape == delta.shape:
                delta = delta + residual[name]
            flat = delta.ravel()
            k = max(1, math.ceil(cfg.fraction * flat.size))
            idx = np.arange(flat.size)
            if k < flat.size:
                idx = np.argpartition(np.abs(flat), flat.size - k)[flat.size - k:]
            idx = np.sort(idx).astype(np.int32)
            payload[f"{name}{SEP}idx"] = idx
            payload[f"{name}{SEP}val"] = flat[idx].astype(np.float32)
            left = flat.copy()
            left[idx] = 0.0
            new_residual[name] = left.reshape(delta.shape)
        else:
            raise AssertionError(f"codec {cfg.method!r} passed validation but has no encoder")
    return payload, new_residual


def decode(payload: Mapping[str, np.ndarray], method: str,
           reference: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Full weights (reference + decoded delta, in the reference's dtypes) from a payload; CompressionError
    when the payload does not fit the global model."""
    parts: dict[str, dict[str, np.ndarray]] = {}
    for key, value in payload.items():
        name, sep, part = key.rpartition(SEP)
        if not sep:
            raise CompressionError(f"payload key {key!r} is not PARAM{SEP}PART")
        parts.setdefault(name, {})[part] = np.asarray(value)
    if set(parts) != set(reference):
        missing = sorted(set(reference) - set(parts))[:3]
        raise CompressionError(f"compressed update has the wrong parameters (missing {missing})")
    out: dict[str, np.ndarray] = {}
    for name, ref in reference.items():
        p = parts[name]
        if "raw" in p:
            out[name] = p["raw"].astype(ref.dtype, copy=False).reshape(ref.shape)
            continue
        if method == "int8" and {"q", "scale"} <= set(p) and p["q"].shape == ref.shape and p["scale"].size == 1:
            delta = p["q"].astype(np.float32) * np.float32(p["scale"].reshape(()))
        elif method == "topk" and {"idx", "val"} <= set(p) and p["idx"].shape == p["val"].shape:
            idx = p["idx"].astype(np.int64)
            if idx.size and (idx.min() < 0 or idx.max() >= ref.size):
                raise CompressionError(f"top-k indices of {name!r} fall outside its {ref.size} entries")
            flat = np.zeros(ref.size, np.float32)
            flat[idx] = p["val"]
            delta = flat.reshape(ref.shape)
        else:
            raise CompressionError(f"compressed update of {name!r} does not fit codec {method!r} and shape {ref.shape}")
        out[name] = (ref.astype(np.float32) + delta).astype(ref.dtype)
    return out


def _numpy(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: as_numpy(v) for k, v in record.items()}


def compress_update(msg: Message, context: Context, call_next) -> Message:  # noqa: ANN001 - Flower's ClientAppCallable
    """Client mod, outermost on `train`: replaces the reply's full weights by the encoded delta and reports
    `upload-bytes` (what is sent) and `dense-bytes` (what float weights would have cost) in its metrics."""
    cfg = CompressionConfig.from_run_config(context.run_config)
    reply = call_next(msg, context)
    arrays = None if reply.has_error() else get_record(reply.content, "arrays", ArrayRecord)
    if arrays is None:
        return reply  # a refusal or a failure: nothing to compress
    dense = record_bytes(arrays)
    sent = dense
    if cfg.enabled:
        weights = _numpy(arrays)
        kept = get_record(context.state, RESIDUAL, ArrayRecord)
        residual = _numpy(kept) if kept is not None else None
        payload, new_residual = encode(_numpy(msg.content["arrays"]), weights, cfg, residual)
        if new_residual:
            context.state[RESIDUAL] = ArrayRecord({k: Array(v) for k, v in new_residual.items()})
        del reply.content["arrays"]
        reply.content[PAYLOAD] = ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in payload.items()})
        reply.content[HEADER] = ConfigRecord({"method": cfg.method, "fraction": cfg.fraction})
        sent = payload_bytes(payload)
    metrics = get_record(reply.content, "metrics", MetricRecord) or MetricRecord()
    metrics["upload-bytes"] = sent
    metrics["dense-bytes"] = dense
    reply.content["metrics"] = metrics
    return reply


def decompress_reply(reply: Message, reference: ArrayRecord) -> str | None:
    """Server side: turn a compressed reply back into full `arrays` (in place). Returns why it could not be
    decoded (the reply then holds no update and is dropped by the checks), or None."""
    payload = None if reply.has_error() else get_record(reply.content, PAYLOAD, ArrayRecord)
    if payload is None:
        return None
    header = get_record(reply.content, HEADER, ConfigRecord) or ConfigRecord()
    try:
        full = decode(_numpy(payload), str(header.get("method", "")), _numpy(reference))
    except (CompressionError, ValueError) as exc:
        del reply.content[PAYLOAD]
        return f"undecodable compressed update: {exc}"
    del reply.content[PAYLOAD]
    reply.content["arrays"] = ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in full.items()})
    return None
