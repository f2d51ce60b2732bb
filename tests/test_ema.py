"""The server's moving average of the global model: its arithmetic, its config check, and a whole run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from common import ConfigError
from server import ServerConfig
from server.ema import ModelEMA
from simulations.cli import main

RUN = ["simulate", "--dataset", "digits", "--model", "logreg", "--num-clients", "2", "--local-epochs", "1",
       "--batch-size", "64", "--lr", "0.5"]


def test_ema_starts_at_the_first_model_then_averages_floats_only():
    ema = ModelEMA(0.75)
    w1 = {"w": np.array([4.0, 8.0], dtype=np.float32), "count": np.array(1)}
    w2 = {"w": np.array([0.0, 0.0], dtype=np.float32), "count": np.array(2)}
    first = ema.update(w1)
    np.testing.assert_array_equal(first["w"], [4.0, 8.0])  # not pulled towards an initial model
    w1["w"][0] = 99.0  # the average holds its own copy
    second = ema.update(w2)
    np.testing.assert_allclose(second["w"], [3.0, 6.0])  # 0.75 * w1 + 0.25 * w2
    assert second["w"].dtype == np.float32
    assert int(second["count"]) == 2  # integer buffers take the latest value


@pytest.mark.parametrize("value", [-0.1, 1.0, 1.5, float("nan")])
def test_ema_decay_outside_0_1_is_a_one_line_error(value):
    with pytest.raises(ConfigError) as err:
        ServerConfig.from_run_config({"ema-decay": value})
    assert "\n" not in str(err.value) and "ema-decay" in str(err.value) and "(0, 1)" in str(err.value)
    assert ServerConfig.from_run_config({"ema-decay": 0}).ema_decay == 0.0


def test_bad_ema_decay_fails_before_training(tmp_path, capsys):
    out = tmp_path / "bad"
    assert main([*RUN, "--rounds", "1", "--set", "ema-decay=1.2", "--out", str(out)]) == 2
    assert "ema-decay = 1.2 is out of range" in capsys.readouterr().err
    assert not out.exists()


def _state(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)


def test_run_reports_the_ema_beside_the_raw_model_and_saves_it(tmp_path):
    """Round 1 of a 2-round run is the 1-round run (same seed): so the saved average must be exactly
    0.6 * (round-1 model) + 0.4 * (round-2 model), and be evaluated separately from the raw model."""
    one = tmp_path / "one"
    two = tmp_path / "two"
    assert main([*RUN, "--rounds", "1", "--set", "ema-decay=0.6", "--out", str(one)]) == 0
    assert main([*RUN, "--rounds", "2", "--set", "ema-decay=0.6", "--out", str(two)]) == 0
    w1, w2, ema = _state(one / "model.pt"), _state(two / "model.pt"), _state(two / "model_ema.pt")
    for key in w2:
        torch.testing.assert_close(ema[key], 0.6 * w1[key] + 0.4 * w2[key])
    rounds = json.loads((two / "metrics.json").read_text())["rounds"]
    assert "ema_accuracy" not in rounds[0]["server"]  # round 0 is the initial model, before any average
    assert rounds[1]["server"]["ema_accuracy"] == rounds[1]["server"]["accuracy"]  # ema_1 = w_1
    assert 0.0 < rounds[2]["server"]["ema_accuracy"] <= 1.0 and "accuracy" in rounds[2]["server"]
    assert not (tmp_path / "none").exists()
    assert main([*RUN, "--rounds", "1", "--out", str(tmp_path / "none")]) == 0
    assert not (tmp_path / "none" / "model_ema.pt").exists()
    none_rounds = json.loads((tmp_path / "none" / "metrics.json").read_text())["rounds"]
    assert all(not any(k.startswith("ema_") for k in r["server"]) for r in none_rounds)


def test_privacy_report_states_the_ema_accuracy_separately(tmp_path):
    out = tmp_path / "dp"
    assert main([*RUN, "--rounds", "2", "--set", "ema-decay=0.5", "--set", "dp=sample",
                 "--set", "noise-multiplier=1.0", "--out", str(out)]) == 0
    last = json.loads((out / "metrics.json").read_text())["rounds"][-1]["server"]
    text = (out / "report.md").read_text()
    assert f"Final server accuracy: {last['accuracy']:.4f} (round 2)." in text
    assert f"moving average of the global model (ema-decay), reported separately: {last['ema_accuracy']:.4f}" in text
    assert "costs no privacy" in text
