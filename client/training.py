"""Local training and evaluation: the same code for a federated client, the centralized baseline and benchmarks."""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Mapping

import numpy as np
import torch
from sklearn import metrics as skm
from torch import nn

from client.config import TrainConfig


def make_optimizer(params, cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.learning_rate, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    return torch.optim.RMSprop(params, lr=cfg.learning_rate, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def as_tensor(a: np.ndarray) -> torch.Tensor:
    """Zero-copy view of a dataset array. Cached datasets are read-only on purpose (shared by every simulated
    client); torch warns about that, but training never writes to its inputs."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(a)


def shuffled_batches(n: int, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Index batches over one epoch; indexing tensors directly is several times cheaper than a DataLoader."""
    order = torch.randperm(n, generator=generator)
    for start in range(0, n, batch_size):
        yield order[start : start + batch_size]


def proximal_term(model: nn.Module, anchor: Mapping[str, torch.Tensor], mu: float) -> torch.Tensor:
    """FedProx: mu/2 * ||w - w_global||^2, which keeps a client near the model it was sent."""
    total = sum(((p - anchor[name]) ** 2).sum() for name, p in model.named_parameters())
    return 0.5 * mu * total


def train(
    model: nn.Module, x: np.ndarray, y: np.ndarray, cfg: TrainConfig, *, seed: int
) -> dict[str, float]:
    """Train `model` in place for cfg.local_epochs over (x, y); returns loss, accuracy and the step count."""
    generator = torch.Generator().manual_seed(seed)
    xt, yt = as_tensor(x), as_tensor(y)
    optimizer = make_optimizer(model.parameters(), cfg)
    loss_fn = nn.CrossEntropyLoss()
    anchor = (
        {n: p.detach().clone() for n, p in model.named_parameters()} if cfg.proximal_mu > 0 else None
    )
    model.train()
    device = next(model.parameters()).device  # the data stays on the host; each batch goes to the model
    total_loss, correct, seen, steps = 0.0, 0, 0, 0
    for _ in range(cfg.local_epochs):
        for idx in shuffled_batches(len(yt), cfg.batch_size, generator):
            xb, yb = xt[idx].to(device), yt[idx].to(device)
            optimizer.zero_grad(set_to_none=True)
            logits = model(xb)
            loss = loss_fn(logits, yb)
            if anchor is not None:
                loss = loss + proximal_term(model, anchor, cfg.proximal_mu)
            loss.backward()
            optimizer.step()
            steps += 1
            total_loss += float(loss.detach()) * len(yb)
            correct += int((logits.argmax(1) == yb).sum())
            seen += len(yb)
    return {"loss": total_loss / max(seen, 1), "accuracy": correct / max(seen, 1), "steps": float(steps)}


@torch.no_grad()
def predict(model: nn.Module, x: np.ndarray, batch_size: int = 1024) -> torch.Tensor:
    model.eval()
    xt = as_tensor(x)
    device = next(model.parameters()).device
    return torch.cat([model(xt[i : i + batch_size].to(device)).cpu() for i in range(0, len(xt), batch_size)])


def classification_metrics(y_true: np.ndarray, logits: torch.Tensor) -> dict[str, float]:
    """Loss, accuracy, macro precision/recall/F1, and ROC AUC for binary tasks (sklearn.metrics)."""
    if len(y_true) == 0:
        return {}
    yt = as_tensor(y_true)
    loss = float(nn.functional.cross_entropy(logits, yt))
    pred = logits.argmax(1).numpy()
    precision, recall, f1, _ = skm.precision_recall_fscore_support(y_true, pred, average="macro", zero_division=0)
    out = {
        "loss": loss,
        "accuracy": float(skm.accuracy_score(y_true, pred)),
        "precision_macro": float(precision),
        "recall_macro": float(recall),
        "f1_macro": float(f1),
    }
    if logits.shape[1] == 2:
        scores = torch.softmax(logits, 1)[:, 1].numpy()
        # AUC is undefined when the held-out part holds a single class (common on small, skewed clients).
        out["roc_auc"] = float(skm.roc_auc_score(y_true, scores)) if len(np.unique(y_true)) == 2 else float("nan")
    return out


def evaluate(model: nn.Module, x: np.ndarray, y: np.ndarray) -> dict[str, float]:
    return classification_metrics(y, predict(model, x))
