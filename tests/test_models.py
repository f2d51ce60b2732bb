"""Tests for the models package: shapes, Opacus compatibility, DP-SGD steps, seeding and errors."""

from __future__ import annotations

import re
import warnings

import pytest
import torch
from opacus import GradSampleModule, PrivacyEngine
from opacus.validators import ModuleValidator
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import models.registry as registry
from models import (
    ModelError,
    TaskSpec,
    build_model,
    check_trainable_with_dp,
    model_names,
    register_model,
)

IMAGE28 = TaskSpec(input_shape=(1, 28, 28), num_classes=10)
IMAGE8 = TaskSpec(input_shape=(1, 8, 8), num_classes=10)
TABULAR = TaskSpec(input_shape=(30,), num_classes=3)
SEQUENCE = TaskSpec(input_shape=(20,), num_classes=40, vocab_size=40)
# Long enough for the n-gram model's 32-character context
CHARS = TaskSpec(input_shape=(40,), num_classes=40, vocab_size=40)
# MiniLM's WordPiece vocabulary (the vader-sentiment task, at a short length)
TEXT = TaskSpec(input_shape=(12,), num_classes=2, vocab_size=30522)

# Every registered model on every test spec it must fit.
CASES = [
    ("logreg", IMAGE28),
    ("logreg", IMAGE8),
    ("logreg", TABULAR),
    ("mlp", IMAGE28),
    ("mlp", IMAGE8),
    ("mlp", TABULAR),
    ("cnn", IMAGE28),
    ("cnn", IMAGE8),
    ("resnet", IMAGE28),
    ("resnet", IMAGE8),
    ("scatter-linear", IMAGE28),
    ("scatter-linear", IMAGE8),
    ("scatter-cnn", IMAGE28),
    ("scatter-cnn", IMAGE8),
    ("lstm", SEQUENCE),
    ("ngram", CHARS),
    ("gpt", CHARS),
    ("transformer", SEQUENCE),
    ("transformer", TEXT),
    ("minilm", TEXT),
    ("minilm-head", TEXT),
]
# Opacus's hooks warn when the input itself needs no gradient, which is always so for data.
pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning")

CASE_IDS = [f"{name}-{'x'.join(map(str, spec.input_shape))}" for name, spec in CASES]


@pytest.fixture(autouse=True)
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _batch(spec: TaskSpec, n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    if spec.kind == "sequence":
        x = torch.randint(0, spec.vocab_size, (n, *spec.input_shape), generator=generator)
    else:
        x = torch.randn((n, *spec.input_shape), generator=generator)
    return x, torch.randint(0, spec.num_classes, (n,), generator=generator)


def test_every_registered_model_is_covered():
    assert sorted({name for name, _ in CASES}) == model_names()
    assert model_names() == ["cnn", "gpt", "logreg", "lstm", "minilm", "minilm-head", "mlp", "ngram", "resnet",
                             "scatter-cnn", "scatter-linear", "transformer"]


@pytest.mark.parametrize(("name", "spec"), CASES, ids=CASE_IDS)
def test_forward_gives_logits_per_example(name, spec):
    model = build_model(name, spec, seed=0)
    x, _ = _batch(spec, 5)
    assert model.training
    assert model(x).shape == (5, spec.num_classes)
    # Poisson sampling in DP-SGD yields empty batches; the model must still answer.
    assert model(x[:0]).shape == (0, spec.num_classes)


@pytest.mark.parametrize(("name", "spec"), CASES, ids=CASE_IDS)
def test_passes_opacus_strict_validation(name, spec):
    model = build_model(name, spec, seed=0)
    assert ModuleValidator.validate(model, strict=True) == []
    check_trainable_with_dp(model)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


@pytest.mark.parametrize(("name", "spec"), CASES, ids=CASE_IDS)
def test_one_dp_sgd_step_changes_every_trainable_parameter(name, spec):
    # (a pretrained model's frozen weights are not trained: minilm)
    model = build_model(name, spec, seed=0)
    before = {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}
    x, y = _batch(spec, 8)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loader = DataLoader(TensorDataset(x, y), batch_size=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # secure-RNG and accountant notices are irrelevant here
        private_model, private_optimizer, private_loader = PrivacyEngine().make_private(
            module=model,
            optimizer=optimizer,
            data_loader=loader,
            noise_multiplier=1.0,
            max_grad_norm=1.0,
        )
    xb, yb = next(iter(private_loader))
    nn.functional.cross_entropy(private_model(xb), yb).backward()
    private_optimizer.step()
    unchanged = [k for k, v in model.named_parameters() if k in before and torch.equal(v, before[k])]
    assert before and unchanged == []


@pytest.mark.parametrize(("name", "spec"), CASES, ids=CASE_IDS)
def test_per_example_gradients_match_single_example_gradients(name, spec):
    # The core DP-SGD assumption: example i's gradient depends on example i alone (no batch mixing).
    x, y = _batch(spec, 3)
    wrapped = GradSampleModule(build_model(name, spec, seed=1), loss_reduction="sum")
    nn.functional.cross_entropy(wrapped(x), y, reduction="sum").backward()
    reference = build_model(name, spec, seed=1)
    for i in range(3):
        reference.zero_grad()
        nn.functional.cross_entropy(reference(x[i : i + 1]), y[i : i + 1], reduction="sum").backward()
        pairs = zip(reference.named_parameters(), wrapped._module.parameters(), strict=True)
        for (key, p_ref), p_wrapped in ((a, b) for a, b in pairs if b.requires_grad):
            assert torch.allclose(p_wrapped.grad_sample[i], p_ref.grad, atol=1e-5, rtol=1e-4), key


@pytest.mark.parametrize(("name", "spec"), CASES, ids=CASE_IDS)
def test_seed_fixes_weights_without_touching_global_rng(name, spec):
    rng_before = torch.get_rng_state()
    a = build_model(name, spec, seed=7).state_dict()
    b = build_model(name, spec, seed=7).state_dict()
    c = build_model(name, spec, seed=8).state_dict()
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    weights = [k for k in a if k.endswith("weight") and a[k].dim() > 1]
    if name.startswith("minilm"):  # pretrained layers are the same whatever the seed; the new head is not
        weights = [k for k in weights if k.startswith("head.")]
    assert weights and all(not torch.equal(a[k], c[k]) for k in weights)


@pytest.mark.parametrize(("name", "spec"), CASES, ids=CASE_IDS)
def test_state_dict_loads_into_a_fresh_model(name, spec):
    # Federated rounds ship state_dicts between server and clients: keys and shapes must round-trip.
    source = build_model(name, spec, seed=3)
    target = build_model(name, spec, seed=4)
    target.load_state_dict(source.state_dict(), strict=True)
    x, _ = _batch(spec, 2)
    assert torch.equal(source(x), target(x))


def test_cnn_for_28x28_has_about_421k_parameters():
    model = build_model("cnn", IMAGE28)
    assert 415_000 <= sum(p.numel() for p in model.parameters()) <= 430_000
    assert sum(isinstance(m, nn.GroupNorm) for m in model.modules()) == 2


def test_cnn_for_8x8_is_smaller_and_channels_follow_the_spec():
    small = build_model("cnn", TaskSpec(input_shape=(3, 8, 8), num_classes=4))
    assert sum(p.numel() for p in small.parameters()) < 50_000
    assert small(torch.randn(2, 3, 8, 8)).shape == (2, 4)


def test_resnet_fits_any_image_size():
    spec = TaskSpec(input_shape=(3, 32, 32), num_classes=10)
    assert build_model("resnet", spec, seed=0)(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_unknown_model_names_the_choices():
    with pytest.raises(ModelError) as err:
        build_model("foo", IMAGE28)
    assert str(err.value) == (
        "unknown model 'foo'; choose one of: cnn, gpt, logreg, lstm, minilm, minilm-head, mlp, ngram, resnet, "
        "scatter-cnn, scatter-linear, transformer"
    )


@pytest.mark.parametrize(
    ("name", "spec", "expected"),
    [
        (
            "cnn",
            TaskSpec(input_shape=(3, 32, 32), num_classes=10),
            "model 'cnn' needs 28x28 or 8x8 images, but the dataset gives 3x32x32 images; "
            "models that fit: logreg, mlp, resnet, scatter-cnn, scatter-linear",
        ),
        (
            "lstm",
            IMAGE28,
            "model 'lstm' needs token sequences, but the dataset gives 1x28x28 images; "
            "models that fit: cnn, logreg, mlp, resnet, scatter-cnn, scatter-linear",
        ),
        (
            "mlp",
            SEQUENCE,
            "model 'mlp' needs tabular rows or images, but the dataset gives token sequences of length 20 "
            "(vocab 40); models that fit: gpt, lstm, transformer",
        ),
        (
            "ngram",
            SEQUENCE,
            "model 'ngram' needs token sequences of length 32 or more, but the dataset gives token sequences of "
            "length 20 (vocab 40); models that fit: gpt, lstm, transformer",
        ),
        (
            "gpt",
            TEXT,
            "model 'gpt' needs a next-token task (as many classes as tokens), but the dataset gives token "
            "sequences of length 12 (vocab 30522); models that fit: lstm, minilm, minilm-head, transformer",
        ),
        (
            "resnet",
            TABULAR,
            "model 'resnet' needs images, but the dataset gives tabular rows of 30 features; "
            "models that fit: logreg, mlp",
        ),
    ],
)
def test_incompatible_task_names_model_need_and_fitting_models(name, spec, expected):
    with pytest.raises(ModelError) as err:
        build_model(name, spec)
    assert str(err.value) == expected


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"input_shape": (28, 28), "num_classes": 10}, "input_shape (28, 28) is not supported"),
        ({"input_shape": (1, 0, 28), "num_classes": 10}, "use positive sizes"),
        ({"input_shape": "28", "num_classes": 10}, "is not a tuple of ints"),
        ({"input_shape": (30,), "num_classes": 1}, "num_classes 1 is not allowed"),
        ({"input_shape": (30,), "num_classes": True}, "num_classes True is not allowed"),
        ({"input_shape": (20,), "num_classes": 5, "vocab_size": 0}, "vocab_size 0 is not allowed"),
        ({"input_shape": (1, 8, 8), "num_classes": 5, "vocab_size": 9}, "vocab_size is set but input_shape"),
    ],
)
def test_bad_task_spec_is_a_one_line_model_error(kwargs, fragment):
    with pytest.raises(ModelError, match=re.escape(fragment)) as err:
        TaskSpec(**kwargs)
    assert "\n" not in str(err.value)


def test_task_spec_kind_and_list_shapes():
    assert (IMAGE28.kind, TABULAR.kind, SEQUENCE.kind) == ("image", "tabular", "sequence")
    spec = TaskSpec(input_shape=[1, 8, 8], num_classes=10)  # as read from JSON
    assert spec.input_shape == (1, 8, 8) and spec == IMAGE8 and hash(spec) == hash(IMAGE8)


@pytest.mark.parametrize("seed", [-1, 1.5, "0", True])
def test_bad_seed_is_rejected(seed):
    with pytest.raises(ModelError, match="seed .* is not allowed; use a non-negative int"):
        build_model("logreg", TABULAR, seed=seed)


def test_spec_must_be_a_task_spec():
    with pytest.raises(ModelError, match="spec must be a TaskSpec, got tuple"):
        build_model("logreg", (30,))


class _BatchNormNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3)
        self.bn1 = nn.BatchNorm2d(4)
        self.rnn = nn.LSTM(4, 4)
        self.head = nn.Linear(4, 2)


def test_check_trainable_with_dp_names_batchnorm_layer_and_fix():
    with pytest.raises(ModelError) as err:
        check_trainable_with_dp(_BatchNormNet())
    message = str(err.value)
    assert "\n" not in message
    assert "layer 'bn1' is BatchNorm2d, which mixes examples in a batch; replace it with GroupNorm" in message
    assert "layer 'rnn' is LSTM" in message and "opacus.layers.DPLSTM" in message
    # The suggested fix really does make the model pass.
    check_trainable_with_dp(ModuleValidator.fix(_BatchNormNet()))


def test_check_trainable_with_dp_flags_frozen_batchnorm_and_groups_many_layers():
    net = nn.Sequential(*(nn.BatchNorm1d(3) for _ in range(7)))
    for p in net.parameters():
        p.requires_grad_(False)  # Opacus skips frozen layers, yet they still mix the batch in training
    with pytest.raises(ModelError, match=r"layers '0', '1', '2', '3', '4' and 2 more are BatchNorm1d"):
        check_trainable_with_dp(net)


def test_check_trainable_with_dp_wants_training_mode():
    model = build_model("mlp", TABULAR).eval()
    with pytest.raises(ModelError, match=r"model is in eval mode; call model.train\(\)"):
        check_trainable_with_dp(model)
    check_trainable_with_dp(model.train())


def test_register_model_adds_a_buildable_model(monkeypatch):
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))  # keep the real table clean

    def four_features(spec: TaskSpec) -> bool:
        return spec.input_shape == (4,)

    @register_model("tiny", kinds=("tabular",), needs="exactly 4 features", fits=four_features)
    def _tiny(spec: TaskSpec) -> nn.Module:
        return nn.Linear(4, spec.num_classes)

    assert "tiny" in model_names()
    assert build_model("tiny", TaskSpec(input_shape=(4,), num_classes=2))(torch.randn(3, 4)).shape == (3, 2)
    with pytest.raises(ModelError, match="model 'tiny' needs exactly 4 features, but the dataset gives"):
        build_model("tiny", TABULAR)
    with pytest.raises(ModelError, match="model 'tiny' is already registered"):
        register_model("tiny", kinds=("tabular",))(_tiny)
    with pytest.raises(ModelError, match="kinds \\('text',\\) for model 'bad' are not allowed"):
        register_model("bad", kinds=("text",))
    with pytest.raises(ModelError, match="model name 'Bad Name' is not allowed"):
        register_model("Bad Name", kinds=("tabular",))


def test_simulate_help_names_every_registered_model(capsys) -> None:  # noqa: ANN001
    from simulations.cli import main

    with pytest.raises(SystemExit):
        main(["simulate", "--help"])
    # argparse wraps long lines, also after a hyphen ("scatter-" / "linear")
    shown = " ".join(re.sub(r"-\n\s*", "-", capsys.readouterr().out).split())
    assert [name for name in model_names() if name not in shown] == []
