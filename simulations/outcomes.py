"""What one finished run achieved, read back from its records alone (config.toml, metrics.json, privacy.json).

The axis of work shared by federated and centralized runs is passes over the training data: after a round,
the examples every trained client went over (its `num-examples` times local epochs), divided by all the
training examples the run's clients hold. One federated round of one local epoch with every client is one
pass; one centralized round (one client holding everything) is one epoch.
"""

from __future__ import annotations

import json
import math
import statistics
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class RunOutcome:
    run_dir: Path
    rounds: tuple[int, ...]  # 0 (the initial model) .. num-rounds
    accuracy: tuple[float, ...]  # server test accuracy after each round
    passes: tuple[float, ...]  # cumulative passes over the training data after each round
    final_accuracy: float
    best_accuracy: float
    best_round: int
    final_f1_macro: float
    rounds_to_target: int | None  # first round whose server accuracy reached the target; None = never
    passes_to_target: float | None
    epsilon: float | None  # the largest final epsilon of any client (sample level), or the user-level one
    delta: float | None
    client_accuracy: tuple[float, ...]  # the final model on each client's held-out split
    num_clients: int
    train_examples: int
    sgd_steps: int
    max_client_steps_per_round: int  # the longest sequential chain of steps in a round
    seconds: float
    dropped_updates: int
    refused_updates: int
    upload_bytes: int = 0  # model bytes the aggregated client updates carried, all rounds (see --compress)

    def client_spread(self) -> tuple[float | None, float | None, float | None]:
        """(min, mean, max) of the per-client accuracies, None when no client evaluated."""
        values = self.client_accuracy
        if not values:
            return None, None, None
        return min(values), statistics.fmean(values), max(values)


def read_outcome(run_dir: str | Path, target_accuracy: float) -> RunOutcome:
    folder = Path(run_dir)
    config = tomllib.loads((folder / "config.toml").read_text())
    rounds = json.loads((folder / "metrics.json").read_text())["rounds"]
    local_epochs = int(config.get("local-epochs", 1))

    # Each client's data size, from any round it trained in (with partial participation not every round
    # sees every client).
    sizes: dict[str, int] = {}
    for r in rounds:
        for entry in r.get("train", []):
            sizes[entry["client_id"]] = int(entry["metrics"].get("num-examples", 0))
    total = sum(sizes.values())

    numbers, accuracy, passes = [], [], []
    done = 0.0
    steps = max_steps = 0
    for r in rounds:
        trained = r.get("train", [])
        done += sum(int(e["metrics"].get("num-examples", 0)) for e in trained) * local_epochs / max(total, 1)
        round_steps = [int(e["metrics"].get("steps", 0)) for e in trained]
        steps += sum(round_steps)
        max_steps = max([max_steps, *round_steps])
        numbers.append(int(r["round"]))
        accuracy.append(_number(r.get("server", {}).get("accuracy")))
        passes.append(done)

    best = max(range(len(accuracy)), key=lambda i: (accuracy[i], -i))
    reached = next((i for i, a in enumerate(accuracy) if a >= target_accuracy), None)
    last = rounds[-1]
    clients = tuple(_number(e["metrics"].get("accuracy")) for e in last.get("evaluate", [])
                    if e["metrics"].get("accuracy") is not None)
    epsilon, delta = _privacy(folder)
    return RunOutcome(
        run_dir=folder,
        rounds=tuple(numbers),
        accuracy=tuple(accuracy),
        passes=tuple(passes),
        final_accuracy=accuracy[-1],
        best_accuracy=accuracy[best],
        best_round=numbers[best],
        final_f1_macro=_number(last.get("server", {}).get("f1_macro")),
        rounds_to_target=None if reached is None else numbers[reached],
        passes_to_target=None if reached is None else passes[reached],
        epsilon=epsilon,
        delta=delta,
        client_accuracy=clients,
        num_clients=int(config.get("num-clients", len(sizes))),
        train_examples=total,
        sgd_steps=steps,
        max_client_steps_per_round=max_steps,
        seconds=sum(float(r.get("seconds", 0.0)) for r in rounds),
        dropped_updates=sum(len(r.get("dropped", [])) for r in rounds),
        refused_updates=sum(len(r.get("refused", [])) for r in rounds),
        upload_bytes=sum(int(r.get("upload_bytes", 0)) for r in rounds),
    )


def _number(value: Any) -> float:
    return float("nan") if value is None else float(value)


def _privacy(folder: Path) -> tuple[float | None, float | None]:
    """The run's final epsilon as privacy.json records it (read as plain JSON, like the privacy report)."""
    path = folder / "privacy.json"
    if not path.is_file():
        return None, None
    record = json.loads(path.read_text())
    candidates = []
    sample = record.get("sample_level")
    if sample and sample.get("clients"):
        # Every client gets its own guarantee; the grid reports the weakest one.
        candidates.append(max(float(c["epsilon"]) for c in sample["clients"]))
    user = record.get("user_level")
    if user:
        candidates.append(float(user["epsilon"]))
    epsilon = max(candidates) if candidates else None
    return (epsilon if epsilon is None or math.isfinite(epsilon) else None), float(record["delta"])
