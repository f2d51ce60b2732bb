"""ScatterNet models and their cached fixed features: DP-trainable heads, the SciPy shim, the cache's refusals."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

import common.features as features
from client.dpsgd import train_private
from common import ConfigError, TrainConfig
from common.features import cache_key, cached_features, check_cache_dir, staged
from common.task import ClientData
from models import ModelError, StagedModel, TaskSpec, build_model, check_trainable_with_dp, split_stages
from simulations.runconfig import resolve, validate

FMNIST = TaskSpec((1, 28, 28), 10)
SMALL = TaskSpec((1, 8, 8), 10)  # the cache tests use 8x8 images: the transform costs far less there


@pytest.fixture(autouse=True)
def _fresh_memory_cache():
    features._memory.clear()
    yield
    features._memory.clear()


def images(n: int, seed: int = 0, side: int = 8) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, 1, side, side)).astype(np.float32)


@pytest.fixture(scope="module")
def stage():
    return split_stages(build_model("scatter-linear", SMALL))[0]


@pytest.mark.parametrize("name", ["scatter-linear", "scatter-cnn"])
def test_scatter_models_pass_opacus_and_take_a_dp_step_on_the_head_only(name):
    model = build_model(name, FMNIST, seed=0)
    assert isinstance(model, StagedModel)
    stage, head = split_stages(model)
    check_trainable_with_dp(model)
    check_trainable_with_dp(head)
    assert not any(True for _ in stage.parameters())  # the transform has nothing to train, so costs no privacy
    x = images(16, side=28)
    feats = stage(torch.from_numpy(x)).numpy()
    assert feats.shape == (16, 81, 7, 7)
    # The whole model and head(features) are the same function.
    with torch.no_grad():
        torch.testing.assert_close(model(torch.from_numpy(x[:4])), head(torch.from_numpy(feats[:4])))
    before = {k: v.clone() for k, v in head.state_dict().items()}
    y = np.arange(16, dtype=np.int64) % 10
    cfg = TrainConfig(model=name, batch_size=8, learning_rate=1.0)
    result = train_private(head, feats, y, cfg, noise_multiplier=1.0, max_grad_norm=0.1, seed=0)
    assert result["steps"] == 2
    assert set(head.state_dict()) == set(before)  # no `_module.` prefix, no kymatio buffers
    assert any(not torch.equal(before[k], v) for k, v in head.state_dict().items())


@pytest.mark.parametrize("spec, shown", [(TaskSpec((30,), 2), "tabular rows of 30 features"),
                                         (TaskSpec((1, 10, 10), 10), "1x10x10 images")])
def test_scatter_model_on_unfit_data_is_one_line_naming_the_models_that_fit(spec, shown):
    with pytest.raises(ModelError) as err:
        build_model("scatter-linear", spec)
    message = str(err.value)
    assert "\n" not in message
    assert "needs 2-D images whose sides are multiples of 4" in message and shown in message
    assert "models that fit:" in message and "scatter-linear" not in message.split("models that fit:")[1]


def test_scipy_shim_gives_the_old_sph_harm_argument_order():
    from models.scatter import _scattering2d

    _scattering2d()
    import scipy.special

    azimuth, polar = 0.7, 1.1
    # Y_1^1 in the old scipy convention sph_harm(m, n, azimuthal, polar): -1/2 sqrt(3/(2 pi)) e^{i az} sin(polar)
    expected = -0.5 * math.sqrt(3 / (2 * math.pi)) * np.exp(1j * azimuth) * math.sin(polar)
    assert scipy.special.sph_harm(1, 1, azimuth, polar) == pytest.approx(expected)


def test_cache_computes_once_then_reads_the_file(stage, tmp_path, monkeypatch):
    x = images(20)
    first = cached_features(stage, x, tmp_path)
    np.testing.assert_allclose(first, stage(torch.from_numpy(x)).numpy(), rtol=1e-6)
    assert len(list(tmp_path.glob("*/*.npy"))) == 2  # the features and their row digests
    features._memory.clear()

    def refuse(*_args):
        raise AssertionError("recomputed although a valid cache file exists")

    monkeypatch.setattr(features, "compute_features", refuse)
    np.testing.assert_array_equal(cached_features(stage, x, tmp_path), first)
    # Other data, another transform setting: another key, never the same file.
    assert cache_key(x, stage.cache_key) != cache_key(images(20, seed=1), stage.cache_key)
    assert cache_key(x, stage.cache_key) != cache_key(x, "another-transform")


def test_no_rows_give_no_features(stage, tmp_path):
    """A client with no held-out rows (holdout-fraction 0) has an empty split: its features are empty too."""
    empty = cached_features(stage, images(0), tmp_path)
    assert empty.shape == (0, *stage.output_shape) and empty.dtype == np.float32


@pytest.mark.parametrize("damage", ["flip-byte", "truncate", "wrong-shape", "no-digest"])
def test_corrupt_or_stale_cache_is_recomputed_never_used(stage, tmp_path, damage):
    x = images(12)
    good = cached_features(stage, x, tmp_path).copy()
    features._memory.clear()
    [path] = [p for p in tmp_path.glob("*/*.npy") if not p.name.endswith(".rows.npy")]
    payload = bytearray(path.read_bytes())
    if damage == "flip-byte":
        payload[-5] ^= 0xFF  # inside the float data: np.load alone would not notice
        path.write_bytes(bytes(payload))
    elif damage == "truncate":
        path.write_bytes(bytes(payload[: len(payload) // 2]))
    elif damage == "wrong-shape":  # a well-formed file with a matching digest, but not what the key promises
        import hashlib
        import io

        buffer = io.BytesIO()
        np.save(buffer, good[:5])
        path.write_bytes(buffer.getvalue())
        digests = path.with_suffix(".sha256").read_text().split()
        path.with_suffix(".sha256").write_text(f"{hashlib.sha256(buffer.getvalue()).hexdigest()}\n{digests[1]}\n")
    else:
        path.with_suffix(".sha256").unlink()
    again = cached_features(stage, x, tmp_path)
    np.testing.assert_array_equal(again, good)
    features._memory.clear()
    np.testing.assert_array_equal(cached_features(stage, x, tmp_path), good)  # and the file was repaired


def test_rows_seen_in_another_file_are_copied_not_recomputed(stage, tmp_path, monkeypatch):
    x = images(16)
    whole = cached_features(stage, x, tmp_path).copy()
    features._memory.clear()
    computed: list[int] = []
    real = features.compute_features
    monkeypatch.setattr(features, "compute_features", lambda st, rows: computed.append(len(rows)) or real(st, rows))
    extra = images(3, seed=5)
    part = np.concatenate([x[[9, 2, 7]], extra])  # another partition: three known rows, three new ones
    got = cached_features(stage, part, tmp_path)
    assert computed == [3]
    np.testing.assert_array_equal(got[:3], whole[[9, 2, 7]])
    np.testing.assert_allclose(got[3:], stage(torch.from_numpy(extra)).numpy(), rtol=1e-6)
    # A corrupt bank is never copied from: its rows are transformed again.
    features._memory.clear()
    for p in tmp_path.glob("*/*.sha256"):
        p.write_text("0\n0\n")
    computed.clear()
    np.testing.assert_array_equal(cached_features(stage, x[[1, 4]], tmp_path), whole[[1, 4]])
    assert computed == [2]


def test_staged_turns_client_data_into_features_and_leaves_plain_models_alone(tmp_path):
    x = images(10)
    y = np.arange(10, dtype=np.int64)
    data = ClientData("0", x[:8], y[:8], x[8:], y[8:], SMALL)
    head, seen = staged(build_model("scatter-cnn", SMALL), data, tmp_path)
    assert seen.x_train.shape == (8, 81, 2, 2) and seen.x_val.shape == (2, 81, 2, 2)
    assert seen.spec.input_shape == (81, 2, 2) and seen.num_examples == 8
    assert set(head.state_dict()) == set(split_stages(build_model("scatter-cnn", SMALL))[1].state_dict())
    cnn = build_model("cnn", SMALL)
    same, untouched = staged(cnn, data, tmp_path)
    assert same is cnn and untouched is data


def test_unwritable_cache_folder_is_a_one_line_error_before_training(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(ConfigError) as err:
        check_cache_dir(str(blocker / "cache"))
    assert "\n" not in str(err.value) and "is not writable" in str(err.value)
    assert "set feature-cache-dir" in str(err.value)
    config = resolve(None, {"dataset": "digits", "model": "scatter-linear", "num-clients": 2,
                            "feature-cache-dir": str(blocker / "cache"), "out-dir": str(tmp_path / "run")})
    with pytest.raises(ConfigError, match="is not writable"):
        validate(config)
    assert not (tmp_path / "run").exists()


def test_scatter_model_on_tabular_data_fails_validation_before_training(tmp_path):
    config = resolve(None, {"dataset": "breast-cancer", "model": "scatter-cnn", "num-clients": 2,
                            "feature-cache-dir": str(tmp_path / "cache"), "out-dir": str(tmp_path / "run")})
    with pytest.raises(ModelError, match="model 'scatter-cnn' needs 2-D images.*models that fit: "):
        validate(config)


@pytest.mark.parametrize("name, clients", [("fmnist_dp_recipe.toml", 10), ("fmnist_dp_recipe_central.toml", 1)])
def test_checked_in_recipes_resolve_and_validate_as_they_are(tmp_path, name, clients):
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "configs" / name
    config = resolve(path, {"feature-cache-dir": str(tmp_path / "cache")})
    assert (config["num-clients"], config["partition"], config["dp"]) == (clients, "iid", "sample")
    assert (config["target-epsilon"], config["delta"], config["accountant"]) == (3.0, 1e-5, "pld")
    assert config["model"].startswith("scatter-") and 0 < config["ema-decay"] < 1
    configs = validate(config)
    assert configs.server.ema_decay == config["ema-decay"]
