"""Compressed client updates: the codecs, error feedback, bytes on the wire, bad input, and DP accounting
that compression (post-processing) must leave unchanged."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord
from flwr.clientapp import ClientApp

from client.app import app as client_app
from common.compression import (
    PAYLOAD,
    RESIDUAL,
    CompressionConfig,
    CompressionError,
    decode,
    encode,
)
from privacy import read_privacy_record
from server.app import app as server_app
from simulations.cli import main
from simulations.inprocess import run_inprocess
from simulations.runconfig import resolve

SMALL = ["--dataset", "digits", "--model", "mlp", "--num-clients", "3", "--rounds", "2", "--local-epochs", "1"]


def _weights(seed: int) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    ref = {"w": rng.normal(size=(40, 25)).astype(np.float32), "b": rng.normal(size=25).astype(np.float32),
           "count": np.array([7], np.int64)}
    new = {"w": ref["w"] + rng.normal(scale=0.1, size=(40, 25)).astype(np.float32),
           "b": ref["b"] + rng.normal(scale=0.1, size=25).astype(np.float32), "count": np.array([8], np.int64)}
    return ref, new


def test_int8_is_a_quarter_of_the_bytes_and_within_half_a_step():
    ref, new = _weights(0)
    payload, residual = encode(ref, new, CompressionConfig("int8"))
    assert residual == {}
    float_bytes = sum(new[k].nbytes for k in ("w", "b"))
    sent = sum(payload[k].nbytes for k in payload if not k.endswith("raw"))
    assert sent == pytest.approx(float_bytes / 4, abs=16)
    out = decode(payload, "int8", ref)
    for k in ("w", "b"):
        step = np.abs(new[k] - ref[k]).max() / 127
        assert out[k].dtype == np.float32
        assert np.abs(out[k] - new[k]).max() <= step / 2 + 1e-6
        assert not np.array_equal(out[k], ref[k])
    assert out["count"].tolist() == [8]  # counters travel as they are


def test_topk_keeps_the_largest_entries_and_error_feedback_loses_nothing():
    ref, new = _weights(1)
    cfg = CompressionConfig.parse("topk:0.02")
    delta = new["w"] - ref["w"]
    payload, residual = encode(ref, new, cfg)
    k = int(np.ceil(0.02 * delta.size))
    assert payload["w::idx"].shape == (k,) and payload["w::idx"].dtype == np.int32
    kept = set(payload["w::idx"].tolist())
    assert kept == set(np.argsort(np.abs(delta).ravel())[-k:].tolist())
    sent = decode(payload, "topk", ref)["w"] - ref["w"]
    # What was sent plus what was kept back is the whole delta, exactly.
    np.testing.assert_allclose(sent + residual["w"], delta, atol=1e-6)
    # With the same delta every round, error feedback delivers all of it: the memory stays bounded while what
    # was sent grows with the rounds (dropping the memory would never send the small entries at all).
    total, memory = sent.copy(), residual
    for _ in range(199):
        payload, memory = encode(ref, new, cfg, memory)
        total += decode(payload, "topk", ref)["w"] - ref["w"]
    np.testing.assert_allclose(total + memory["w"], 200 * delta, atol=2e-3)
    assert np.linalg.norm(memory["w"]) < 0.15 * np.linalg.norm(200 * delta)
    assert np.count_nonzero(total) > 0.8 * delta.size  # without feedback: the same 2%, every round


def test_without_error_feedback_the_same_entries_repeat():
    """The broken mechanism (memory dropped) keeps resending the same coordinates: feedback must differ."""
    ref, new = _weights(2)
    cfg = CompressionConfig.parse("topk:0.01")
    first, memory = encode(ref, new, cfg)
    again, _ = encode(ref, new, cfg)
    fed, _ = encode(ref, new, cfg, memory)
    assert np.array_equal(first["w::idx"], again["w::idx"])
    assert not np.array_equal(first["w::idx"], fed["w::idx"])


@pytest.mark.parametrize("payload_fix", ["out-of-range", "missing", "wrong-codec"])
def test_decode_rejects_a_payload_that_does_not_fit(payload_fix):
    ref, new = _weights(3)
    payload, _ = encode(ref, new, CompressionConfig.parse("topk:0.1"))
    method = "topk"
    if payload_fix == "out-of-range":
        payload["w::idx"] = payload["w::idx"] + 10_000
    elif payload_fix == "missing":
        payload = {k: v for k, v in payload.items() if not k.startswith("b::")}
    else:
        method = "int8"
    with pytest.raises(CompressionError):
        decode(payload, method, ref)


@pytest.mark.parametrize(("text", "fragment"), [
    ("topk:0", "out of range; it must be in (0, 1]"),
    ("topk:1.5", "out of range; it must be in (0, 1]"),
    ("topk:nan", "out of range"),
    ("topk:x", "needs a fraction"),
    ("gzip", "is not a codec"),
])
def test_bad_compress_is_one_line_before_training(tmp_path, capsys, text, fragment):
    out = tmp_path / "bad"
    assert main(["simulate", *SMALL, "--out", str(out), "--compress", text]) == 2
    err = capsys.readouterr().err.strip()
    assert fragment in err and len(err.splitlines()) == 1 and err.startswith("fedpriv simulate: error:")
    assert not (out / "metrics.json").exists()


@pytest.mark.parametrize("strategy", ["krum", "median", "trimmed-mean"])
def test_robust_strategies_refuse_compression(tmp_path, capsys, strategy):
    assert main(["simulate", *SMALL, "--out", str(tmp_path / "x"), "--compress", "int8", "--strategy", strategy]) == 2
    err = capsys.readouterr().err.strip()
    assert f"{strategy!r} compares whole updates" in err and len(err.splitlines()) == 1
    assert CompressionConfig.parse("topk:1").fraction == 1.0  # the upper bound is allowed


def test_secure_aggregation_refuses_compression(tmp_path, capsys):
    assert main(["simulate", *SMALL, "--out", str(tmp_path / "x"), "--compress", "int8", "--set", "secagg=true"]) == 2
    err = capsys.readouterr().err.strip()
    assert "cannot be combined with secagg" in err and len(err.splitlines()) == 1


def test_runs_record_bytes_and_keep_the_residual_in_client_state(tmp_path):
    runs = {}
    for codec in ("none", "int8", "topk:0.05"):
        rc = resolve(None, {"dataset": "digits", "model": "mlp", "num-clients": 3, "num-rounds": 2,
                            "compress": codec, "out-dir": str(tmp_path / codec.replace(":", "-"))})
        grid = run_inprocess(server_app, client_app, [{"partition-id": i} for i in range(3)], rc)
        runs[codec] = (json.loads((Path(rc["out-dir"]) / "metrics.json").read_text())["rounds"], grid)
    dense = runs["none"][0][1]["dense_bytes"]
    assert dense > 0 and runs["none"][0][1]["upload_bytes"] == dense
    for codec, (ratio_low, ratio_high) in {"int8": (0.24, 0.27), "topk:0.05": (0.09, 0.11)}.items():
        rounds, grid = runs[codec]
        for r in rounds[1:]:
            assert r["dense_bytes"] == dense and ratio_low < r["upload_bytes"] / dense < ratio_high
            assert sorted(e["client_id"] for e in r["train"]) == ["0", "1", "2"] and not r["dropped"]
        has_memory = [RESIDUAL in grid.context_of(n).state.array_records for n in grid.get_node_ids()]
        assert has_memory == [codec.startswith("topk")] * 3
    # int8 costs almost nothing in accuracy here; every run learned.
    acc = {c: rounds[-1]["server"]["accuracy"] for c, (rounds, _) in runs.items()}
    assert abs(acc["int8"] - acc["none"]) < 0.05 and min(acc.values()) > runs["none"][0][0]["server"]["accuracy"]
    a, b = (torch.load(tmp_path / d / "model.pt") for d in ("none", "int8"))
    assert not all(torch.equal(a[k], b[k]) for k in a)  # int8 really changed what arrived


def test_undecodable_update_is_dropped_and_recorded(tmp_path):
    app = ClientApp()

    @app.query()
    def hello(msg, context):
        return client_app(msg, context)

    @app.evaluate()
    def evaluate(msg, context):
        return client_app(msg, context)

    @app.train()
    def train(msg, context):
        reply = client_app(msg, context)
        if str(context.node_config["partition-id"]) == "1":
            payload = reply.content[PAYLOAD]
            key = next(k for k in payload.keys() if k.endswith("::idx"))
            payload[key] = Array(payload[key].numpy() + 1_000_000)
            reply.content[PAYLOAD] = ArrayRecord(dict(payload.items()))
        return reply

    rc = resolve(None, {"dataset": "digits", "model": "mlp", "num-clients": 3, "num-rounds": 1,
                        "compress": "topk:0.1", "out-dir": str(tmp_path / "run")})
    run_inprocess(server_app, app, [{"partition-id": i} for i in range(3)], rc)
    r = json.loads((tmp_path / "run" / "metrics.json").read_text())["rounds"][1]
    assert [d["client_id"] for d in r["dropped"]] == ["1"] and "undecodable" in r["dropped"][0]["reason"]
    assert sorted(e["client_id"] for e in r["train"]) == ["0", "2"]


@pytest.mark.parametrize(("dp_flags", "codec"), [
    (["--set", "dp=sample", "--set", "noise-multiplier=1.1", "--set", "delta=1e-3"], "topk:0.01"),
    (["--set", "dp=local", "--set", "local-epsilon=0.5"], "int8"),
])
def test_compression_is_post_processing_privacy_accounting_unchanged(tmp_path, dp_flags, codec):
    plain = tmp_path / "plain"
    packed = tmp_path / "packed"
    assert main(["simulate", *SMALL, "--out", str(plain), *dp_flags]) == 0
    assert main(["simulate", *SMALL, "--out", str(packed), *dp_flags, "--compress", codec]) == 0
    a, b = read_privacy_record(plain / "privacy.json"), read_privacy_record(packed / "privacy.json")
    for level in ("sample_level", "user_level", "local"):
        assert a.get(level) == b.get(level)
    assert a.get("sample_level") or a.get("local")
    rounds = json.loads((packed / "metrics.json").read_text())["rounds"]
    assert all(r["upload_bytes"] < r["dense_bytes"] / 3 for r in rounds[1:])
    assert all(len(r["train"]) == 3 for r in rounds[1:])  # the noisy updates were decoded and aggregated
