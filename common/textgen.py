"""Writing with a run's character language model (Shakespeare): sampling and held-out perplexity.

The models predict the character after an 80-character window (common.datasets.SEQ_LEN), so writing is a
loop: predict, sample one character, slide the window. A prompt shorter than the window is left-padded
with spaces (training windows often start mid-line, so a run of spaces is ordinary context); the `<unk>`
id is never sampled. Characters outside the alphabet are refused, naming them, rather than silently mapped.

Sampling from a trained model reads only the model: with DP training it is post-processing of the private
model and costs no further privacy, however many samples are drawn.
"""

from __future__ import annotations

import json
import math
import tomllib
from collections.abc import Generator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from common.config import DataConfig, TrainConfig
from common.datasets import OOV_ID, SEQ_LEN, SHAKESPEARE_ALPHABET, SHAKESPEARE_VOCAB_SIZE, DataError, encode_text
from models import TaskSpec, build_model
from models.sequence import CharLSTM
from privacy.files import write_atomic

TEXT_DATASETS = ("shakespeare",)
SAMPLE_FILE = "sample.json"  # the run's own sample, written at the end of training, shown in its report
DEFAULT_PROMPT = "ROMEO:\nWhat light through yonder window breaks? "
PAD = " "


@dataclass(frozen=True)
class RunModel:
    model: nn.Module
    run_config: dict[str, Any]


def check_prompt(prompt: str) -> None:
    unknown = sorted({c for c in prompt if c not in SHAKESPEARE_ALPHABET})
    if unknown:
        shown = ", ".join(repr(c) for c in unknown[:10])
        raise DataError(f"the prompt holds characters the model's vocabulary lacks: {shown}; remove or replace "
                        "them (the vocabulary is LEAF's 80 Shakespeare characters: letters, digits, common "
                        "punctuation, space and newline)")


def text_model(run_config: dict[str, Any], state: dict[str, torch.Tensor] | None = None) -> nn.Module:
    """The run's model for its text dataset, with weights `state` if given."""
    data = DataConfig.from_run_config(run_config)
    if data.dataset not in TEXT_DATASETS:
        raise DataError(f"this run trained on {data.dataset!r}, not on text; generate needs a character language "
                        f"model trained on {', '.join(TEXT_DATASETS)} (e.g. --dataset shakespeare --model ngram)")
    # The same TaskSpec the shakespeare loader gives, without parsing 38 plays to get it.
    spec = TaskSpec((SEQ_LEN,), SHAKESPEARE_VOCAB_SIZE, vocab_size=SHAKESPEARE_VOCAB_SIZE)
    model = build_model(TrainConfig.from_run_config(run_config).model, spec)
    if state is not None:
        model.load_state_dict(state)
    return model.eval()


def load_run_model(run_dir: str | Path) -> RunModel:
    folder = Path(run_dir)
    config_path, model_path = folder / "config.toml", folder / "model.pt"
    for path in (config_path, model_path):
        if not path.is_file():
            raise DataError(f"{path} does not exist; pass the folder a finished fedpriv run wrote its records into")
    run_config = tomllib.loads(config_path.read_text())
    state = torch.load(model_path, weights_only=True)
    return RunModel(text_model(run_config, state), run_config)


@torch.no_grad()
def generate(model: nn.Module, prompt: str, length: int = 300, temperature: float = 0.8, seed: int = 0) -> str:
    """`length` characters continuing `prompt`. temperature 0 takes the most likely character each step."""
    check_prompt(prompt)
    if length < 1:
        raise DataError(f"length {length} is not allowed; ask for at least 1 character")
    if not (math.isfinite(temperature) and temperature >= 0):
        raise DataError(f"temperature {temperature} is not allowed; use a number >= 0 (0 = most likely character)")
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    window = torch.from_numpy(encode_text(PAD * max(0, SEQ_LEN - len(prompt)) + prompt)[-SEQ_LEN:].copy())[None]
    step = _lstm_stepper(model, window) if isinstance(model, CharLSTM) else _window_stepper(model, window)
    out: list[str] = []
    logits = next(step)
    for _ in range(length):
        logits = logits[0].double()
        logits[OOV_ID] = -math.inf
        if temperature == 0:
            nxt = int(logits.argmax())
        else:
            nxt = int(torch.multinomial(torch.softmax(logits / temperature, dim=0), 1, generator=generator))
        out.append(SHAKESPEARE_ALPHABET[nxt])
        logits = step.send(nxt)
    return "".join(out)


def _window_stepper(model: nn.Module, window: torch.Tensor) -> Generator[torch.Tensor, int, None]:
    """Next-character logits from the last SEQ_LEN characters, exactly the context the model trained on."""
    while True:
        nxt = yield model(window)
        window = torch.cat([window[:, 1:], torch.tensor([[nxt]])], dim=1)


def _lstm_stepper(model: CharLSTM, window: torch.Tensor) -> Generator[torch.Tensor, int, None]:
    """The LSTM reads the window once, then carries its state forward one character at a time: SEQ_LEN
    times cheaper than re-reading the window (its context then grows past SEQ_LEN, as a recurrent model's may)."""
    output, state = model.lstm(model.embedding(window))
    while True:
        nxt = yield model.head(output[:, -1, :])
        output, state = model.lstm(model.embedding(torch.tensor([[nxt]])), state)


@torch.no_grad()
def perplexity(model: nn.Module, x: np.ndarray, y: np.ndarray, batch_size: int = 512) -> float:
    """exp(mean next-character cross-entropy) over (x, y)."""
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(y), batch_size):
        xb = torch.as_tensor(np.asarray(x[start:start + batch_size]))
        yb = torch.as_tensor(np.asarray(y[start:start + batch_size]))
        total += float(nn.functional.cross_entropy(model(xb), yb, reduction="sum"))
        count += len(yb)
    return math.exp(total / max(count, 1))


def held_out_windows(run_config: dict[str, Any], limit: int = 5000, seed: int = 0) -> tuple[np.ndarray, np.ndarray,
                                                                                             str]:
    """Windows no client of the run trained on: the roles left out of a `natural` partition (its clients
    are the largest roles), or, when every role trained, the server's test split (each role's last 15%).
    At most `limit` windows, a seeded sample. Returns (x, y, what they are in words)."""
    from common.datasets import load_dataset
    from common.task import _partitions

    data = DataConfig.from_run_config(run_config)
    # At the default stride whatever the run's text-stride: the same held-out windows for every run.
    ds = load_dataset(data.dataset, data.data_dir or None)
    x, y, what = ds.x_test, ds.y_test, "the server test split (the last 15% of every role's lines)"
    if data.partition == "natural" and ds.groups is not None:
        parts = _partitions(data.dataset, data.data_dir, data.partition, data.num_clients, data.seed, 0,
                            data.text_stride)
        trained = load_dataset(data.dataset, data.data_dir or None, stride=data.text_stride).groups
        used = np.isin(ds.groups, np.unique(trained[np.concatenate(parts)]))
        roles = len(set(ds.groups[~used].tolist()))
        if roles:
            x, y = ds.x_train[~used], ds.y_train[~used]
            what = f"{roles} roles that no client held (held-out roles)"
    if len(y) > limit:
        pick = np.sort(np.random.default_rng(seed).choice(len(y), limit, replace=False))
        x, y = x[pick], y[pick]
    return x, y, what


POST_PROCESSING = ("Generated text is post-processing of the trained model: drawing samples reads only the model, "
                   "so with DP it costs no privacy beyond what training spent.")


def write_run_sample(run_dir: str | Path, length: int = 300, temperature: float = 0.8, seed: int = 0) -> Path:
    """RUN_DIR/sample.json: a sample from the run's model, which the run's report shows."""
    run = load_run_model(run_dir)
    text = generate(run.model, DEFAULT_PROMPT, length, temperature, seed)
    record: dict[str, Any] = {"prompt": DEFAULT_PROMPT, "text": text, "length": length, "temperature": temperature,
                              "seed": seed, "dp": str(run.run_config.get("dp", "none")), "note": POST_PROCESSING}
    path = Path(run_dir) / SAMPLE_FILE
    write_atomic(path, json.dumps(record, indent=1))
    return path
