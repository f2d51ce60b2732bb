"""Book-keeping DP-SGD (client/bookkeeping.py) against Opacus: the same clipped gradient, the same batches, the
same noise, the same weights after a round; and the guards around it."""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
from opacus import GradSampleModule
from opacus.data_loader import DPDataLoader
from opacus.optimizers import DPOptimizer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import client.bookkeeping as bk
from client.bk_rules import conv2d_rule, forward_stats, group_norm_rule
from client.dpsgd import train_private
from common.config import ConfigError, TrainConfig
from models import build_model
from models.task import ModelError, TaskSpec
from privacy.accounting import PrivacyError

IMAGE = TaskSpec((1, 8, 8), 4)
SPECS = {
    "logreg": TaskSpec((10,), 3),
    "mlp": TaskSpec((10,), 3),
    "cnn": IMAGE,  # tanh, Conv2d + GroupNorm + Linear
    "resnet": IMAGE,  # ReLU, strided and 1x1 convs without bias, GroupNorm
    "transformer": TaskSpec((12,), 5, vocab_size=20),  # Embedding, LayerNorm, Linear on sequences
}


def _data(name: str, batch: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    spec = SPECS[name]
    g = torch.Generator().manual_seed(seed)
    if spec.vocab_size:
        x = torch.randint(0, spec.vocab_size, (batch, *spec.input_shape), generator=g)
    else:
        x = torch.randn(batch, *spec.input_shape, generator=g)
    return x, torch.randint(0, spec.num_classes, (batch,), generator=g)


def _opacus_clipped_sum(model: nn.Module, x: torch.Tensor, y: torch.Tensor, clip: float) -> dict[str, torch.Tensor]:
    """The reference: Opacus hooks mode's per-sample gradients, clipped and summed by Opacus' own optimizer."""
    model = copy.deepcopy(model)
    gsm = GradSampleModule(model, batch_first=True, loss_reduction="sum")
    opt = DPOptimizer(torch.optim.SGD(gsm.parameters(), lr=0.0), noise_multiplier=0.0, max_grad_norm=clip,
                      expected_batch_size=1, loss_reduction="sum")
    nn.functional.cross_entropy(gsm(x), y, reduction="sum").backward()
    opt.pre_step()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def _opacus_grad_samples(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    gsm = GradSampleModule(copy.deepcopy(model), batch_first=True, loss_reduction="sum")
    nn.functional.cross_entropy(gsm(x), y, reduction="sum").backward()
    return {n.removeprefix("_module."): p.grad_sample for n, p in gsm.named_parameters()}


def _clip_like_opacus(samples: dict[str, torch.Tensor], clip: float) -> dict[str, torch.Tensor]:
    """DPOptimizer.clip_and_accumulate's arithmetic on Opacus' per-sample gradients (one backward, many clips)."""
    norms = torch.stack([g.reshape(len(g), -1).norm(2, dim=-1) for g in samples.values()], dim=1).norm(2, dim=1)
    factor = (clip / (norms + 1e-6)).clamp(max=1.0)
    return {n: torch.einsum("i,i...", factor, g) for n, g in samples.items()}


def _bk_clipped_sum(model: nn.Module, x: torch.Tensor, y: torch.Tensor, clip: float) -> dict[str, torch.Tensor]:
    keeper = bk.BookKeeper(model)
    try:
        sums, _, _ = keeper.clipped_sum(x, y, clip)
    finally:
        keeper.close()
    return {n: sums.get(p, torch.zeros_like(p)) for n, p in model.named_parameters()}


def _assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    for name in want:
        scale = want[name].abs().max().item()
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-6 * max(scale, 1.0), msg=name)


@pytest.mark.parametrize("name", sorted(SPECS))
@pytest.mark.parametrize("batch", [1, 7, 64])
def test_clipped_sum_equals_opacus_hooks(name: str, batch: int) -> None:
    model = build_model(name, SPECS[name], seed=1)
    x, y = _data(name, batch)
    samples = _opacus_grad_samples(model, x, y)
    norms = torch.cat([g.reshape(batch, -1) for g in samples.values()], 1).norm(dim=1)
    keeper = bk.BookKeeper(model)
    try:
        _, _, bk_norms = keeper.clipped_sum(x, y, 1.0)
        torch.testing.assert_close(bk_norms, norms, rtol=1e-4, atol=1e-6)
        # clip every example, some of them (the median), none
        for clip in (0.5 * norms.min().item(), norms.median().item(), 2.0 * norms.max().item()):
            sums, _, _ = keeper.clipped_sum(x, y, clip)
            got = {n: sums.get(p, torch.zeros_like(p)) for n, p in model.named_parameters()}
            _assert_same(got, _clip_like_opacus(samples, clip))
    finally:
        keeper.close()


def test_reference_clipping_is_opacus_own() -> None:
    """The many-clips shortcut above does what Opacus' DPOptimizer does."""
    model = build_model("cnn", IMAGE, seed=1)
    x, y = _data("cnn", 7)
    _assert_same(_clip_like_opacus(_opacus_grad_samples(model, x, y), 0.3), _opacus_clipped_sum(model, x, y, 0.3))


def test_empty_batch_has_zero_clipped_sum() -> None:
    model = build_model("cnn", IMAGE, seed=1)
    x, y = _data("cnn", 0)
    assert all(float(s.abs().sum()) == 0.0 for s in _bk_clipped_sum(model, x, y, 1.0).values())


@pytest.mark.parametrize("stride,padding,dilation,bias", [(2, 1, 1, True), (1, 0, 2, False), (3, 2, 1, True),
                                                         (1, "same", 1, True)])
def test_conv_rule_matches_opacus_for_strides_padding_dilation(stride, padding, dilation, bias) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, stride=stride, padding=padding, dilation=dilation, bias=bias),
                          nn.Tanh(), nn.Flatten(), nn.LazyLinear(2))
    x, y = torch.randn(5, 3, 9, 9), torch.randint(0, 2, (5,))
    model(x)  # materialise the lazy layer
    model[3] = nn.Linear(model[3].in_features, 2)
    _assert_same(_bk_clipped_sum(model, x, y, 0.1), _opacus_clipped_sum(model, x, y, 0.1))


# 8 input channels: 3x3: 2*9*9 <= 16*72, the ghost norm; 8x8 (64 positions): shifted GEMMs; 12x12 (144): oneDNN
# grouped conv; 'same' with an even kernel pads asymmetrically: shifted GEMMs. 3 input channels (27 weights per
# output channel): the im2col windows with a row of ones, at any size
@pytest.mark.parametrize("side,kernel,padding,cin", [(3, 3, 1, 8), (8, 3, 1, 8), (12, 3, 1, 8), (12, 2, "same", 8),
                                                     (12, 3, 1, 3), (7, 2, "same", 3)])
def test_conv_rule_branches_match_autograd(side: int, kernel: int, padding, cin: int) -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(cin, 16, kernel, padding=padding)
    a, g, c = torch.randn(4, cin, side, side), torch.randn(4, 16, side, side), torch.rand(4)
    layer = conv2d_rule(conv, a, g, None)
    want_norms, want_sum, want_bias = [], torch.zeros_like(conv.weight), torch.zeros_like(conv.bias)
    for b in range(4):
        gw, gb = torch.autograd.grad(conv(a[b:b + 1]), (conv.weight, conv.bias), g[b:b + 1])
        want_norms.append(gw.square().sum() + gb.square().sum())
        want_sum += c[b] * gw
        want_bias += c[b] * gb
    torch.testing.assert_close(layer.norm_sq, torch.stack(want_norms), rtol=1e-4, atol=1e-4)
    got = {id(p): s for p, s in layer.clipped_sum(c)}
    torch.testing.assert_close(got[id(conv.weight)], want_sum, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got[id(conv.bias)], want_bias, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("saved,frozen", [(True, None), (False, None), (True, "bias"), (False, "weight")])
def test_group_norm_rule_matches_autograd(saved: bool, frozen: str | None) -> None:
    """Per-example GroupNorm gradients from torch's fused kernel with the batch as groups: from the forward's
    saved statistics and from recomputed ones, with either affine parameter frozen."""
    torch.manual_seed(0)
    norm = nn.GroupNorm(4, 8)
    nn.init.normal_(norm.weight)
    nn.init.normal_(norm.bias)
    if frozen is not None:
        getattr(norm, frozen).requires_grad_(False)
    a, g, c = torch.randn(5, 8, 6, 6) * 3 + 1, torch.randn(5, 8, 6, 6), torch.rand(5)
    stats = forward_stats(norm, norm(a)) if saved else None
    assert (stats is not None) == saved
    layer = group_norm_rule(norm, a, g, stats)
    params = [p for p in (norm.weight, norm.bias) if p.requires_grad]
    want_norms, want_sums = [], [torch.zeros_like(p) for p in params]
    for b in range(5):
        grads = torch.autograd.grad(norm(a[b:b + 1]), params, g[b:b + 1])
        want_norms.append(sum(gr.square().sum() for gr in grads))
        for total, gr in zip(want_sums, grads, strict=True):
            total += c[b] * gr
    torch.testing.assert_close(layer.norm_sq, torch.stack(want_norms), rtol=1e-4, atol=1e-5)
    got = dict(layer.clipped_sum(c))
    assert set(got) == set(params)
    for p, want in zip(params, want_sums, strict=True):
        torch.testing.assert_close(got[p], want, rtol=1e-4, atol=1e-5)


def test_poisson_batches_are_opacus_batches() -> None:
    n, batch = 50, 8
    dataset = TensorDataset(torch.arange(n))
    loader = DPDataLoader.from_data_loader(DataLoader(dataset, batch_size=batch,
                                                      generator=torch.Generator().manual_seed(5)))
    steps = len(loader)
    gen = torch.Generator().manual_seed(5)
    for _ in range(2):  # two epochs: the generator state carries over
        ours = [b.tolist() for b in bk.poisson_batches(n, 1 / steps, steps, gen)]
        theirs = [b[0].tolist() for b in loader]
        assert ours == theirs


def _cfg(**kw) -> TrainConfig:
    base = dict(model="cnn", batch_size=16, local_epochs=2, learning_rate=0.1, momentum=0.9)
    return TrainConfig(**{**base, **kw})


def _round(mode: str, noise: float, x: np.ndarray, y: np.ndarray, cfg: TrainConfig, canaries=None):  # noqa: ANN001, ANN202
    model = build_model("cnn", IMAGE, seed=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = train_private(model, x, y, cfg, noise_multiplier=noise, max_grad_norm=0.5, seed=11,
                               grad_sample_mode=mode, canaries=canaries)
    return model, result


@pytest.mark.parametrize("noise", [0.0, 1.0])
def test_round_gives_opacus_hooks_weights(noise: float) -> None:
    """Same batches, same clipping, same noise draws: the same model after a round (no empty batch here, since
    Opacus' own path cannot step on one)."""
    x, y = (t.numpy() for t in _data("cnn", 64, seed=2))
    ours, result = _round(None, noise, x, y, _cfg())
    theirs, reference = _round("hooks", noise, x, y, _cfg())
    assert result["grad-sample-mode"] == "bk" and reference["grad-sample-mode"] == "hooks"
    assert result["steps"] == reference["steps"] == 8.0
    assert result["loss"] == pytest.approx(reference["loss"], rel=1e-4)
    for (name, p), q in zip(ours.named_parameters(), theirs.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=name)


def test_noise_std_is_z_c_over_expected_batch() -> None:
    """Zero gradients (zero inputs, no bias): one SGD step at lr 1 moves each weight by noise / expected batch."""
    n, z, clip = 6, 1.3, 0.7
    model = nn.Sequential(nn.Linear(100, 200, bias=False))
    before = model[0].weight.detach().clone()
    cfg = _cfg(model="logreg", batch_size=4, local_epochs=1, learning_rate=1.0, momentum=0.0)
    result = bk.train_bookkeeping(model, np.zeros((n, 100), np.float32), np.zeros(n, np.int64), cfg,
                                  noise_multiplier=z, max_grad_norm=clip, seed=0)
    steps = int(result["steps"])
    assert steps == 2  # ceil(6 / 4); q = 1/2, expected batch int(6 * 0.5) = 3
    moved = (before - model[0].weight.detach()).flatten()
    # two independent steps: the sum has std sqrt(2) * z * C / 3
    want = (steps ** 0.5) * z * clip / 3
    assert moved.std().item() == pytest.approx(want, rel=0.03)
    assert abs(moved.mean().item()) < 0.05 * want


def test_empty_batches_step_with_noise_only() -> None:
    """q = 1/20 over 20 examples: some batches are empty; each still counts as a step and adds noise."""
    n = 20
    x = np.zeros((n, 10), np.float32)
    y = np.zeros(n, np.int64)
    cfg = _cfg(model="logreg", batch_size=1, local_epochs=1, learning_rate=1.0, momentum=0.0)
    sizes = [len(b) for b in bk.poisson_batches(n, 1 / n, n, torch.Generator().manual_seed(0))]
    assert 0 in sizes  # the seed gives empty batches
    model = nn.Sequential(nn.Linear(10, 3, bias=False))
    with torch.no_grad():
        model[0].weight.zero_()
    result = bk.train_bookkeeping(model, x, y, cfg, noise_multiplier=1.0, max_grad_norm=1.0, seed=0)
    assert result["steps"] == float(n)
    assert model[0].weight.abs().sum() > 0


class _Rows:
    def __init__(self, rows: dict[int, list[tuple[str, int, float]]]) -> None:
        self.by_step, self.asked = rows, []

    def rows(self, step: int) -> list[tuple[str, int, float]]:
        self.asked.append(step)
        return self.by_step.get(step, [])


def test_canary_row_is_clipped_and_scaled_like_an_example() -> None:
    """One row of value 10*C at one coordinate, noise 0, one step at lr 0.1: that coordinate moves by exactly
    lr*C/expected_batch more than without the row, and nothing else moves."""
    x, y = (t.numpy() for t in _data("cnn", 32, seed=4))
    cfg = _cfg(batch_size=32, local_epochs=1, momentum=0.0)  # one step, q = 1, expected batch 32
    clip = 0.5
    stub = _Rows({0: [("fc2.weight", 7, 10 * clip)]})
    plain, _ = _round("bk", 0.0, x, y, cfg)
    marked, result = _round("bk", 0.0, x, y, cfg, canaries=stub)
    assert stub.asked == [0] and result["steps"] == 1.0
    diff = {n: (p - q).detach() for (n, p), q in zip(marked.named_parameters(), plain.parameters(), strict=True)}
    want = -0.1 * clip / 32
    assert diff["fc2.weight"].view(-1)[7].item() == pytest.approx(want, rel=1e-4)
    diff["fc2.weight"].view(-1)[7] = 0.0
    assert all(float(d.abs().max()) < 1e-7 for d in diff.values())


def test_canary_rows_naming_unknown_parameters_are_refused() -> None:
    x, y = (t.numpy() for t in _data("cnn", 8))
    with pytest.raises(PrivacyError, match="not a trainable parameter"):
        _round("bk", 0.0, x, y, _cfg(), canaries=_Rows({0: [("nope.weight", 0, 1.0)]}))
    with pytest.raises(PrivacyError, match="out of range"):
        _round("bk", 0.0, x, y, _cfg(), canaries=_Rows({0: [("fc2.bias", 99, 1.0)]}))


def test_broken_clipping_is_caught() -> None:
    """The exactness check has teeth: a clipping factor that forgets to clip differs from Opacus."""
    model = build_model("cnn", IMAGE, seed=1)
    x, y = _data("cnn", 7)
    want = _opacus_clipped_sum(model, x, y, 0.01)
    original = bk.clip_factors
    try:
        bk.clip_factors = lambda norms, c: torch.ones_like(norms)
        got = _bk_clipped_sum(model, x, y, 0.01)
    finally:
        bk.clip_factors = original
    with pytest.raises(AssertionError):
        _assert_same(got, want)


@pytest.mark.parametrize("name,mode", [("lstm", "hooks"), ("mlp", "ghost")])
def test_opacus_modes_step_on_empty_poisson_batches(name: str, mode: str) -> None:
    """q = 1/20 over 20 examples: about a third of the batches are empty. Opacus' own path (the fallback) must
    step on them with noise only, as book-keeping does, instead of failing for want of per-sample gradients."""
    spec = TaskSpec((6,), 4, vocab_size=10) if name == "lstm" else TaskSpec((6,), 4)
    rng = np.random.default_rng(0)
    x = rng.integers(0, 10, (20, 6)) if name == "lstm" else rng.normal(size=(20, 6)).astype(np.float32)
    y = rng.integers(0, 4, 20)
    model = build_model(name, spec, seed=0)
    before = [p.detach().clone() for p in model.parameters()]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = train_private(model, x, y, _cfg(model=name, batch_size=1, local_epochs=1, momentum=0.0),
                               noise_multiplier=1.0, max_grad_norm=1.0, seed=0, grad_sample_mode=mode)
    assert result["steps"] == 20.0 and result["grad-sample-mode"] == mode
    assert all(not torch.equal(b, p) for b, p in zip(before, model.parameters(), strict=True))


def test_lstm_falls_back_to_opacus_and_says_so() -> None:
    spec = TaskSpec((6,), 4, vocab_size=10)
    model = build_model("lstm", spec, seed=0)
    assert bk.bk_unsupported(model) == "layer 'lstm': no book-keeping rule for DPLSTM"
    x = np.random.default_rng(0).integers(0, 10, (16, 6))
    y = np.random.default_rng(1).integers(0, 4, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = train_private(model, x, y, _cfg(model="lstm", batch_size=8, local_epochs=1), noise_multiplier=1.0,
                               max_grad_norm=1.0, seed=0)
    assert result["grad-sample-mode"] in ("ghost", "hooks")
    with pytest.raises(ModelError, match="book-keeping DP-SGD cannot train this model .*DPLSTM.*Opacus"):
        train_private(model, x, y, _cfg(model="lstm", batch_size=8, local_epochs=1, grad_sample_mode="bk"),
                      noise_multiplier=1.0, max_grad_norm=1.0, seed=0, grad_sample_mode="bk")


def test_grad_sample_mode_key_is_validated() -> None:
    assert TrainConfig.from_run_config({"grad-sample-mode": "BK"}).grad_sample_mode == "bk"
    assert TrainConfig.from_run_config({}).grad_sample_mode == "auto"
    with pytest.raises(ConfigError, match="grad-sample-mode 'fast'.*auto, bk, ghost, hooks"):
        TrainConfig.from_run_config({"grad-sample-mode": "fast"})


def test_layer_run_twice_is_not_bookkept() -> None:
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(torch.tanh(self.fc(x)))

    model = Twice()
    assert "runs 2 times" in bk.bk_unsupported(model, torch.zeros(1, 4))
    with pytest.raises(ModelError, match="ran twice"):
        bk.BookKeeper(model).clipped_sum(torch.zeros(2, 4), torch.zeros(2, dtype=torch.long), 1.0)


def test_tied_and_frozen_shared_weights_are_refused() -> None:
    tied = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4))
    tied[2].weight = tied[0].weight
    x, y = np.zeros((8, 4), np.float32), np.zeros(8, np.int64)
    cfg = _cfg(model="logreg", batch_size=4, local_epochs=1)
    with pytest.raises(ModelError, match="tied weights"):
        train_private(tied, x, y, cfg, noise_multiplier=1.0, max_grad_norm=1.0, seed=0)
    frozen = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4))
    frozen[2].weight = nn.Parameter(frozen[0].weight.detach(), requires_grad=False)
    with pytest.raises(ModelError, match="shares memory"):
        train_private(frozen, x, y, cfg, noise_multiplier=1.0, max_grad_norm=1.0, seed=0)
