"""`fedpriv generate`: sampling from a run's character model, its bad input, the run's sample and its report."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import tomli_w
import torch
from torch import nn

from client.bookkeeping import BK_MODE, BookKeeper
from client.dpsgd import train_private
from common import objective
from common.config import TrainConfig
from common.datasets import OOV_ID, SEQ_LEN, SHAKESPEARE_ALPHABET, SHAKESPEARE_VOCAB_SIZE, encode_text
from common.textgen import SAMPLE_FILE, generate, perplexity, text_model, write_run_sample
from common.training import train
from models.sequence import NGRAM_CONTEXT, CausalCharTransformer, CharNgram
from models.task import ModelError
from simulations.cli import main
from simulations.runconfig import resolve


class NextLetter(nn.Module):
    """A stand-in language model: certain that the character after the window's last is the next id;
    with `unk_bias` it rates <unk> higher still, which generation must ignore."""

    def __init__(self, unk_bias: bool = True) -> None:
        super().__init__()
        self.unk_bias = unk_bias

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        logits = torch.full((len(tokens), SHAKESPEARE_VOCAB_SIZE), -20.0)
        logits[torch.arange(len(tokens)), (tokens[:, -1] + 1) % SHAKESPEARE_VOCAB_SIZE] = 20.0
        if self.unk_bias:
            logits[:, OOV_ID] = 30.0  # the most likely "character" of all is <unk>: it must never be written
        return logits


def fake_run(tmp_path: Path, model: str = "lstm", dataset: str = "shakespeare", **extra) -> Path:
    out = tmp_path / f"run-{model}-{dataset}"
    out.mkdir()
    rc = resolve(None, {"dataset": dataset, "model": model, "partition": "natural", "num-clients": 4,
                        "out-dir": str(out), **extra})
    (out / "config.toml").write_text(tomli_w.dumps(rc))
    if dataset == "shakespeare":
        torch.manual_seed(0)
        torch.save(text_model(rc).state_dict(), out / "model.pt")
    return out


def test_generation_follows_the_model_and_never_writes_unknown():
    text = generate(NextLetter(), "abc", length=5, temperature=0.0)
    assert text == "defgh"
    # Sampling at a low temperature from a near-certain model writes the same; <unk> is masked out.
    assert generate(NextLetter(), "abc", length=5, temperature=0.5, seed=3) == "defgh"


def test_a_broken_sampler_would_be_caught_by_perplexity():
    x = np.stack([encode_text(" " * 79 + c) for c in "abcdefgh"])
    y = x[:, -1] + 1
    assert perplexity(NextLetter(unk_bias=False), x, y) == pytest.approx(1.0, abs=1e-6)
    assert perplexity(NextLetter(unk_bias=False), x, y + 1) > 1e10  # sure of the wrong character


@pytest.mark.parametrize(("model", "length"), [("lstm", 12), ("transformer", 40), ("ngram", 40), ("gpt", 40)])
def test_generate_command_is_seeded_and_uses_the_vocabulary(tmp_path, capsys, model, length):
    run = fake_run(tmp_path, model)
    outputs = []
    for seed in (1, 1, 2):
        assert main(["generate", str(run), "--prompt", "To be, or not", "--length", str(length),
                     "--seed", str(seed)]) == 0
        outputs.append(capsys.readouterr().out.rstrip("\n"))
    assert outputs[0] == outputs[1] != outputs[2]
    written = outputs[0][len("To be, or not"):]
    assert outputs[0].startswith("To be, or not") and len(written) == length
    assert set(written) <= set(SHAKESPEARE_ALPHABET)


def test_ngram_writes_from_its_last_characters_and_pads_short_prompts(tmp_path):
    """The n-gram model reads the last NGRAM_CONTEXT characters of the 80-character window: what comes before
    cannot change its writing, and a short prompt is the same as one left-padded with spaces."""
    model = text_model(resolve(None, {"dataset": "shakespeare", "model": "ngram"}))
    tail = "And thus I clothe my naked villainy"[-NGRAM_CONTEXT:]
    one, other = generate(model, "x" * 60 + tail, 30, 0.0), generate(model, "QUEEN:\n" + tail, 30, 0.0)
    assert one == other
    assert generate(model, "Thus", 30, 0.8, seed=5) == generate(model, " " * (SEQ_LEN - 4) + "Thus", 30, 0.8, seed=5)
    with pytest.raises(ModelError, match="shorter than the model's context 32"):
        model(torch.zeros((1, NGRAM_CONTEXT - 1), dtype=torch.long))


def _cycled_windows(text: str, count: int) -> tuple[np.ndarray, np.ndarray]:
    ids = encode_text(text * (1 + (count + SEQ_LEN) // len(text)))
    x = np.lib.stride_tricks.sliding_window_view(ids, SEQ_LEN)[:count].copy()
    return x, ids[SEQ_LEN:SEQ_LEN + count].copy()


def test_ngram_learns_a_line_under_dp_sgd_and_writes_it():
    """DP-SGD (book-keeping, every layer covered) on a repeated line, then generation: a model whose private
    training or whose sampling were broken would not write the line back."""
    line = "Now is the winter of our discontent\n"
    x, y = _cycled_windows(line, 400)
    torch.manual_seed(0)
    model = text_model(resolve(None, {"dataset": "shakespeare", "model": "ngram"})).train()
    cfg = TrainConfig(model="ngram", optimizer="adam", learning_rate=0.01, batch_size=50, local_epochs=4)
    result = train_private(model, x, y, cfg, noise_multiplier=0.5, max_grad_norm=1.0, seed=0)
    assert result["grad-sample-mode"] == BK_MODE
    assert perplexity(model, x[:100], y[:100]) < 1.5
    assert generate(model, line * 3, len(line), 0.0) == line


def _bk_norms(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Book-keeping's (logits, per-example gradient norms) for one batch."""
    keeper = BookKeeper(model)
    try:
        _, logits, norms = keeper.clipped_sum(x, y, 1.0)
    finally:
        keeper.close()
    return logits, norms


def _grad_sample_norms(gsm: nn.Module, batch: int) -> torch.Tensor:
    """Per-example gradient norms from an Opacus GradSampleModule after its backward pass."""
    return torch.cat([p.grad_sample.reshape(batch, -1) for p in gsm.parameters()], 1).norm(dim=1)


@pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning")  # data needs no gradient
def test_ngram_book_keeping_clips_like_opacus():
    """Book-keeping's per-example gradient norms on the n-gram model (the embedding of a sliced window
    included) are those Opacus' hooks compute from materialised per-example gradients."""
    from opacus import GradSampleModule

    torch.manual_seed(1)
    model = CharNgram(SHAKESPEARE_VOCAB_SIZE, SHAKESPEARE_VOCAB_SIZE, hidden=32)
    x, y = _cycled_windows("To be, or not to be: that is the question:\n", 6)
    gsm = GradSampleModule(CharNgram(SHAKESPEARE_VOCAB_SIZE, SHAKESPEARE_VOCAB_SIZE, hidden=32), loss_reduction="sum")
    gsm._module.load_state_dict(model.state_dict())
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    nn.functional.cross_entropy(gsm(xt), yt, reduction="sum").backward()
    want = _grad_sample_norms(gsm, len(y))
    torch.testing.assert_close(_bk_norms(model, xt, yt)[1], want, rtol=1e-4, atol=1e-6)


def _small_gpt(seed: int = 1) -> CausalCharTransformer:
    torch.manual_seed(seed)
    return CausalCharTransformer(SHAKESPEARE_VOCAB_SIZE, SEQ_LEN, SHAKESPEARE_VOCAB_SIZE, d_model=16, heads=2,
                                 layers=1, ff_dim=32)


def test_gpt_reads_only_to_the_left_and_answers_at_the_last_position():
    """Position t's logits must not depend on characters after t (else training on every position would
    leak each target into its own input), and `forward` is the last position's answer."""
    model = _small_gpt().eval()
    x, _ = _cycled_windows("To be, or not to be: that is the question:\n", 2)
    xt = torch.from_numpy(x)
    changed = xt.clone()
    changed[:, 50] = (changed[:, 50] + 1) % SHAKESPEARE_VOCAB_SIZE
    with torch.no_grad():
        before, after = model.forward_every_position(xt), model.forward_every_position(changed)
        torch.testing.assert_close(model(xt), before[:, -1])
    torch.testing.assert_close(before[:, :50], after[:, :50])
    assert (before[:, 50:] - after[:, 50:]).abs().amax() > 1e-4
    targets = objective.next_tokens(xt, torch.tensor([7, 9]))
    assert targets[:, :-1].tolist() == xt[:, 1:].tolist() and targets[:, -1].tolist() == [7, 9]


def _loop_norms(model: nn.Module, x: torch.Tensor, y: torch.Tensor, last_only: bool = False) -> torch.Tensor:
    """Each example's gradient norm, one example at a time (the definition, no per-example tricks)."""
    norms = []
    for i in range(len(y)):
        model.zero_grad()
        outputs = model.forward_every_position(x[i:i + 1])
        loss = (nn.functional.cross_entropy(outputs[:, -1], y[i:i + 1]) if last_only
                else objective.loss(outputs, x[i:i + 1], y[i:i + 1], reduction="sum"))
        loss.backward()
        norms.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]).norm())
    return torch.stack(norms)


@pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning")  # data needs no gradient
def test_gpt_example_gradient_is_its_mean_over_positions_in_bk_and_opacus():
    """One window is one example: book-keeping's and Opacus' per-example norms are those of the mean loss over
    the window's positions, computed one example at a time. A trainer that scored only the label would give
    other norms, which this check tells apart."""
    from opacus import GradSampleModule

    model = _small_gpt()
    x, y = (torch.from_numpy(a) for a in _cycled_windows("Now is the winter of our discontent\n", 5))
    want = _loop_norms(model, x, y)
    assert not torch.allclose(_loop_norms(model, x, y, last_only=True), want, rtol=1e-2)
    logits, got = _bk_norms(model, x, y)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    assert logits.shape == (len(y), SHAKESPEARE_VOCAB_SIZE)
    gsm = GradSampleModule(_small_gpt(), loss_reduction="sum")
    objective.loss(objective.training_outputs(gsm, x), x, y, reduction="sum").backward()
    torch.testing.assert_close(_grad_sample_norms(gsm, len(y)), want, rtol=1e-4, atol=1e-6)


@pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning")
def test_gpt_dp_round_is_the_same_in_bk_hooks_and_ghost():
    """Same batches, clipping and noise draws: one DP-SGD round gives the same model whichever way the
    per-example gradients are taken, ghost clipping's sequence loss included."""
    x, y = _cycled_windows("Now is the winter of our discontent\n", 48)
    cfg = TrainConfig(model="gpt", optimizer="sgd", learning_rate=0.5, batch_size=16, local_epochs=1)
    models, results = {}, {}
    for mode in ("bk", "hooks", "ghost"):
        models[mode] = _small_gpt(seed=4)
        results[mode] = train_private(models[mode], x, y, cfg, noise_multiplier=0.5, max_grad_norm=0.1, seed=3,
                                      grad_sample_mode=mode)
        assert results[mode]["grad-sample-mode"] == mode
    start = _small_gpt(seed=4)
    assert not torch.allclose(models["bk"].head.weight, start.head.weight)
    for mode in ("hooks", "ghost"):
        assert results[mode]["loss"] == pytest.approx(results["bk"]["loss"], rel=1e-4)
        for (name, p), q in zip(models["bk"].named_parameters(), models[mode].parameters(), strict=True):
            torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=f"{mode}: {name}")


def test_gpt_learns_a_line_from_every_position_and_writes_it():
    """60 windows of a repeated line, 75 Adam steps: taught all 80 positions of each window, the model writes
    the line back. Book-keeping DP-SGD's clipping (noise off: at this size any noise drowns a 430k-weight
    model) trains the same objective to the same place."""
    line = "Now is the winter of our discontent\n"
    x, y = _cycled_windows(line, 60)
    cfg = TrainConfig(model="gpt", optimizer="adam", learning_rate=0.003, batch_size=20, local_epochs=25)
    torch.manual_seed(0)
    plain = text_model(resolve(None, {"dataset": "shakespeare", "model": "gpt"})).train()
    assert train(plain, x, y, cfg, seed=0)["steps"] == 75
    assert perplexity(plain, x, y) < 1.1 and generate(plain, line * 3, len(line), 0.0) == line
    clipped = text_model(resolve(None, {"dataset": "shakespeare", "model": "gpt"})).train()
    result = train_private(clipped, x, y, cfg, noise_multiplier=0.0, max_grad_norm=1.0, seed=0)
    assert result["grad-sample-mode"] == BK_MODE and perplexity(clipped, x, y) < 1.2


@pytest.mark.parametrize(("flags", "fragment"), [
    (["--prompt", "naïve café ☃"], "characters the model's vocabulary lacks: 'é', 'ï', '☃'"),
    (["--temperature", "-1"], "temperature -1.0 is not allowed"),
    (["--length", "0"], "length 0 is not allowed"),
])
def test_bad_generate_input_is_one_line(tmp_path, capsys, flags, fragment):
    run = fake_run(tmp_path)
    assert main(["generate", str(run), *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert fragment in err and len(err.splitlines()) == 1 and err.startswith("fedpriv generate: error:")


def test_generate_refuses_a_run_that_is_not_text(tmp_path, capsys):
    run = fake_run(tmp_path, "mlp", "digits")
    torch.save({}, run / "model.pt")
    assert main(["generate", str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert "trained on 'digits', not on text" in err and len(err.splitlines()) == 1
    assert main(["generate", str(tmp_path / "nowhere")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_dp_report_shows_the_sample_as_post_processing(tmp_path):
    """A DP run's records plus the sample a language-model run writes: the report shows both, and says why
    the sample costs nothing (the records of a small digits run stand in for a Shakespeare run's)."""
    out = tmp_path / "dp"
    assert main(["simulate", "--dataset", "digits", "--model", "mlp", "--num-clients", "2", "--rounds", "1",
                 "--set", "dp=sample", "--set", "noise-multiplier=1.0", "--set", "delta=1e-3",
                 "--compress", "int8", "--out", str(out)]) == 0
    assert "Post-processing" in (out / "report.md").read_text()  # compression is named as post-processing
    lm = fake_run(tmp_path)
    write_run_sample(lm, length=40)
    sample = json.loads((lm / SAMPLE_FILE).read_text())
    assert len(sample["text"]) == 40 and "no privacy" in sample["note"]
    (out / SAMPLE_FILE).write_text(json.dumps(sample))
    assert main(["report", str(out)]) == 0
    report = (out / "report.md").read_text()
    assert sample["text"][:30] in report and "post-processing of the DP-trained model" in report
    assert "compressed (int8) after DP-SGD" in report
    assert math.isfinite(json.loads((out / "metrics.json").read_text())["rounds"][-1]["server"]["loss"])


@pytest.mark.parametrize("value", ["0", "81"])
def test_a_bad_text_stride_fails_before_training(tmp_path, capsys, value):
    out = tmp_path / "bad"
    assert main(["simulate", "--dataset", "shakespeare", "--model", "ngram", "--num-clients", "2", "--rounds", "1",
                 "--set", f"text-stride={value}", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"text-stride = {value} is out of range" in err and err.count("\n") == 1
    assert value == "0" or f"use 1 to {SEQ_LEN}" in err
    assert not out.exists()


def test_held_out_windows_do_not_depend_on_the_training_stride():
    """The same roles are held out and the same windows drawn at any text-stride, so runs compare."""
    from common.textgen import held_out_windows

    keys = {"dataset": "shakespeare", "partition": "natural", "num-clients": 20}
    x20, y20, what20 = held_out_windows(keys, limit=500)
    x10, y10, what10 = held_out_windows({**keys, "text-stride": 10}, limit=500)
    assert what20 == what10 and "roles that no client held" in what20
    np.testing.assert_array_equal(x20, x10)
    np.testing.assert_array_equal(y20, y10)
