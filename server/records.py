"""A run's records: config.toml, metrics.json, metrics.csv and model.pt in the run's folder.

metrics.json and metrics.csv are rewritten after every round (atomically), so a run that stops early keeps
every round it finished.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import tomli_w
import torch

from privacy.files import write_atomic


def clean(value: Any) -> Any:
    """JSON has no NaN: an undefined metric (e.g. ROC AUC on a one-class split) is written as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean(v) for v in value]
    return value


class RunRecords:
    """Collects per-round records and keeps the files in `out_dir` current."""

    def __init__(self, out_dir: str | Path, run_config: Mapping[str, Any], keep_existing: bool = False) -> None:
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.rounds: list[dict[str, Any]] = []
        existing = self.out_dir / "metrics.json"
        if keep_existing and existing.exists():  # a resumed run goes on with the rounds already recorded
            self.rounds = json.loads(existing.read_text())["rounds"]
        write_atomic(self.out_dir / "config.toml", tomli_w.dumps(dict(run_config)))

    def add_round(self, record: dict[str, Any]) -> None:
        self.rounds = [r for r in self.rounds if r["round"] != record["round"]] + [clean(record)]
        self.rounds.sort(key=lambda r: r["round"])
        self._flush()

    def final_server_metrics(self) -> dict[str, Any]:
        return self.rounds[-1]["server"] if self.rounds else {}

    def save_model(self, state_dict: Mapping[str, torch.Tensor]) -> Path:
        path = self.out_dir / "model.pt"
        buffer = io.BytesIO()
        torch.save(dict(state_dict), buffer)
        write_atomic(path, buffer.getvalue())
        return path

    def _flush(self) -> None:
        write_atomic(self.out_dir / "metrics.json", json.dumps({"rounds": self.rounds}, indent=1))
        write_atomic(self.out_dir / "metrics.csv", metrics_csv(self.rounds))


def metrics_csv(rounds: list[dict[str, Any]]) -> str:
    """One row per (round, source, client): source is 'server', 'train' or 'evaluate'."""
    rows: list[dict[str, Any]] = []
    for r in rounds:
        rows.append({"round": r["round"], "source": "server", "client_id": "", **r.get("server", {})})
        for source in ("train", "evaluate"):
            for entry in r.get(source, []):
                rows.append({"round": r["round"], "source": source, "client_id": entry["client_id"],
                             **entry["metrics"]})
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()
