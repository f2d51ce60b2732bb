"""Token-sequence models: a character LSTM, a small Transformer encoder, a neural n-gram and a small GPT-style
causal Transformer, all Opacus-ready.

torch's nn.LSTM fuses its weights in a way Opacus cannot split per example; opacus.layers.DPLSTM
computes the same function from nn.Linear pieces, which Opacus's per-sample gradient rules support.
Self-attention is written here from nn.Linear for the same reason (opacus.layers.DPMultiheadAttention
would also do, but it fails on the empty batches that Poisson sampling produces).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.registry import register_model
from models.task import ModelError, TaskSpec


class CharLSTM(nn.Module):
    """Embedding -> 2-layer LSTM -> Linear on the last time step (next-character logits)."""

    def __init__(self, vocab_size: int, num_classes: int, embed_dim: int = 8, hidden: int = 256) -> None:
        super().__init__()
        # Imported here: opacus costs seconds to import, which a run without this model should not pay.
        from opacus.layers import DPLSTM

        self.embedding = nn.Embedding(vocab_size, embed_dim)
        self.lstm = DPLSTM(embed_dim, hidden, num_layers=2, batch_first=True)
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        output, _ = self.lstm(self.embedding(tokens))
        return self.head(output[:, -1, :])


@register_model("lstm", kinds=("sequence",))
def build_lstm(spec: TaskSpec) -> nn.Module:
    assert spec.vocab_size is not None  # guaranteed by kind == "sequence"
    return CharLSTM(spec.vocab_size, spec.num_classes)


class SelfAttention(nn.Module):
    """Multi-head self-attention built from nn.Linear, so Opacus takes per-example gradients."""

    def __init__(self, d_model: int, heads: int, causal: bool = False) -> None:
        super().__init__()
        if d_model % heads:
            raise ModelError(f"d_model {d_model} is not divisible by heads {heads}; pick a divisor of it")
        self.heads, self.causal = heads, causal
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, d_model = x.shape
        # Explicit sizes, no -1: reshapes that infer a size fail on an empty batch.
        qkv = self.qkv(x).view(batch, length, 3, self.heads, d_model // self.heads)
        query, key, value = qkv.permute(2, 0, 3, 1, 4)  # each (batch, heads, length, head_dim)
        attended = F.scaled_dot_product_attention(query, key, value, is_causal=self.causal)
        return self.out(attended.transpose(1, 2).reshape(batch, length, d_model))


class EncoderLayer(nn.Module):
    """Pre-norm Transformer encoder layer: x + attn(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, d_model: int, heads: int, ff_dim: int, causal: bool = False) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(d_model)
        self.attention = SelfAttention(d_model, heads, causal)
        self.norm2 = nn.LayerNorm(d_model)
        self.feed_forward = nn.Sequential(nn.Linear(d_model, ff_dim), nn.GELU(), nn.Linear(ff_dim, d_model))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.norm1(x))
        return x + self.feed_forward(self.norm2(x))


class TransformerClassifier(nn.Module):
    """Token + learned position embeddings, encoder layers, LayerNorm, mean pool over time, Linear."""

    def __init__(
        self,
        vocab_size: int,
        max_len: int,
        num_classes: int,
        d_model: int = 64,
        heads: int = 4,
        layers: int = 2,
        ff_dim: int = 128,
        causal: bool = False,
    ) -> None:
        super().__init__()
        self.max_len = max_len
        self.token_embedding = nn.Embedding(vocab_size, d_model)
        # Positions as an nn.Embedding (not a bare nn.Parameter) so Opacus has a per-sample grad rule.
        self.position_embedding = nn.Embedding(max_len, d_model)
        self.layers = nn.Sequential(*(EncoderLayer(d_model, heads, ff_dim, causal) for _ in range(layers)))
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, num_classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self._encode(tokens)).mean(dim=1))

    def _encode(self, tokens: torch.Tensor) -> torch.Tensor:
        """(batch, length, d_model): the encoder layers' output, before the final LayerNorm."""
        batch, length = tokens.shape
        if length > self.max_len:
            raise ModelError(
                f"sequence length {length} exceeds the model's max length {self.max_len}; "
                "truncate inputs or build the model with a TaskSpec of the longer length"
            )
        # One row of positions per example, so Opacus takes the position table's gradient per example;
        # contiguous because Opacus's ghost-clipping rule for embeddings calls .view on the indices.
        positions = torch.arange(length, device=tokens.device).expand(batch, length).contiguous()
        return self.layers(self.token_embedding(tokens) + self.position_embedding(positions))


@register_model("transformer", kinds=("sequence",))
def build_transformer(spec: TaskSpec) -> nn.Module:
    assert spec.vocab_size is not None  # guaranteed by kind == "sequence"
    return TransformerClassifier(spec.vocab_size, spec.input_shape[0], spec.num_classes)


# Characters the n-gram model reads: a verse line runs about 40 characters, so 32 cover most of one.
NGRAM_CONTEXT = 32


class CharNgram(nn.Module):
    """A neural n-gram character model (Bengio et al. 2003): the last `context` characters' embeddings,
    concatenated, through two LayerNorm+GELU hidden layers, to next-character logits.

    Why it exists next to `lstm`: on the 2-core CPUs here the DPLSTM reads 80 time steps in a Python loop
    (about 11 ms an example to train, and DP-SGD must fall back to Opacus hooks), while this model is made of
    Embedding, Linear and LayerNorm only: about 0.2 ms an example, and book-keeping DP-SGD covers every layer.
    Characters before the last `context` are ignored, so the model sees exactly what it trained on whatever
    the window length."""

    def __init__(self, vocab_size: int, num_classes: int, context: int = NGRAM_CONTEXT, embed_dim: int = 16,
                 hidden: int = 512, dropout: float = 0.0) -> None:
        super().__init__()
        self.context, self.embed_dim = context, embed_dim
        self.embedding = nn.Embedding(vocab_size, embed_dim)
        self.hidden1 = nn.Linear(context * embed_dim, hidden)
        self.norm1 = nn.LayerNorm(hidden)
        self.hidden2 = nn.Linear(hidden, hidden)
        self.norm2 = nn.LayerNorm(hidden)
        # Off by default, as in models/minilm.py: with dropout an example's gradient also depends on the random
        # mask, so the exact per-example checks (book-keeping against Opacus, canary audits) no longer hold.
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        batch, length = tokens.shape
        if length < self.context:
            raise ModelError(f"sequence length {length} is shorter than the model's context {self.context}; "
                             "left-pad the inputs (e.g. with spaces) to at least that length")
        # Explicit sizes, no -1: a reshape that infers a size fails on an empty (Poisson-sampled) batch.
        x = self.embedding(tokens[:, length - self.context:]).reshape(batch, self.context * self.embed_dim)
        x = self.dropout(F.gelu(self.norm1(self.hidden1(x))))
        x = self.dropout(F.gelu(self.norm2(self.hidden2(x))))
        return self.head(x)


@register_model("ngram", kinds=("sequence",), needs=f"token sequences of length {NGRAM_CONTEXT} or more",
                fits=lambda spec: spec.input_shape[0] >= NGRAM_CONTEXT)
def build_ngram(spec: TaskSpec) -> nn.Module:
    assert spec.vocab_size is not None  # guaranteed by kind == "sequence"
    return CharNgram(spec.vocab_size, spec.num_classes)


class CausalCharTransformer(TransformerClassifier):
    """A small GPT-style character model: the Transformer above with causal attention, read out at every
    position instead of pooled: next-character logits at each one.

    Why it exists next to `ngram`: the n-gram model learns from one target per window (the character after it),
    so an 80-character window every 20 characters gives it one target per 20 characters of text. Position t of
    this model sees only characters 0..t, so one window teaches it 80 next characters at once, each after its
    own left context; training windows need not overlap (`text-stride 80`). `every_position` tells the trainers
    (common/objective.py) to score all of them: an example's loss is the mean over its positions, so one window
    stays one example for clipping and for DP's accounting. `forward` returns the logits after the last
    character, as every other model does, so evaluation, perplexity and `fedpriv generate` work unchanged."""

    every_position = True

    def __init__(self, vocab_size: int, max_len: int, num_classes: int, d_model: int = 128, heads: int = 4,
                 layers: int = 2, ff_dim: int = 512) -> None:
        if num_classes != vocab_size:
            raise ModelError(f"a causal language model predicts the next token, so it needs as many classes as "
                             f"tokens; the task has {num_classes} classes and {vocab_size} tokens "
                             "(use a next-character dataset such as shakespeare)")
        super().__init__(vocab_size, max_len, num_classes, d_model, heads, layers, ff_dim, causal=True)

    def forward_every_position(self, tokens: torch.Tensor) -> torch.Tensor:
        """(batch, length, classes): at position t, the logits of the character after tokens[:, :t + 1]."""
        return self.head(self.norm(self._encode(tokens)))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        # The last position only through the norm and head: the same numbers, 1/length of that work.
        return self.head(self.norm(self._encode(tokens)[:, -1]))


@register_model("gpt", kinds=("sequence",), needs="a next-token task (as many classes as tokens)",
                fits=lambda spec: spec.num_classes == spec.vocab_size)
def build_gpt(spec: TaskSpec) -> nn.Module:
    assert spec.vocab_size is not None  # guaranteed by kind == "sequence"
    return CausalCharTransformer(spec.vocab_size, spec.input_shape[0], spec.num_classes)
