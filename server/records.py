"""A run's records: config.toml, metrics.jsonl, metrics.json, metrics.csv and model.pt in the run's folder.

Each finished round is appended, never rewritten: one JSON line to metrics.jsonl (flushed to disk before the
next round starts, so a run that stops early keeps every round it finished) and its rows to metrics.csv.
metrics.json (`{"rounds": [...]}`, what `fedpriv report`, compare and sweep read) is the same rounds as one
document, one round a line, joined from each round's JSON line as encoded once for metrics.jsonl (json's
indented output goes through its pure-Python encoder: 10-30 ms a round on a 100-client round). Rewriting it
after every round still grows quadratically with the run, so after a round it is rewritten only if that keeps
its rewrites under JSON_MAX_SHARE of the time since the last one (slow rounds, as in a deployment: every
round), and always when the run ends.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import tomli_w

from privacy.files import write_atomic

JSON_MAX_SHARE = 0.1  # of a run's time, at most this much goes to rewriting metrics.json


def clean(value: Any) -> Any:
    """JSON has no NaN: an undefined metric (e.g. ROC AUC on a one-class split) is written as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean(v) for v in value]
    return value


def read_rounds(run_dir: str | Path) -> list[dict[str, Any]]:
    """Every recorded round, in order: from metrics.jsonl (complete up to the last finished round), else from
    metrics.json. A round recorded twice (a resumed run that repeated it) counts once, the later record."""
    run_dir = Path(run_dir)
    lines = run_dir / "metrics.jsonl"
    if lines.exists():
        by_round: dict[int, dict[str, Any]] = {}
        for line in lines.read_text().splitlines():
            # A line cut short by a crash mid-write is the only line that can fail to parse: the last one.
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            by_round[int(record["round"])] = record
        return [by_round[r] for r in sorted(by_round)]
    document = run_dir / "metrics.json"
    return json.loads(document.read_text())["rounds"] if document.exists() else []


class RunRecords:
    """Collects per-round records and keeps the files in `out_dir` current."""

    def __init__(self, out_dir: str | Path, run_config: Mapping[str, Any], keep_existing: bool = False) -> None:
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.rounds: list[dict[str, Any]] = read_rounds(self.out_dir) if keep_existing else []
        self._lines = [json.dumps(r) for r in self.rounds]  # each round's JSON, in round order, encoded once
        self._columns: list[str] = []
        self._json_written = -math.inf  # when metrics.json was last rewritten (time.monotonic)
        self._json_cost = 0.0  # and how long that took
        write_atomic(self.out_dir / "config.toml", tomli_w.dumps(dict(run_config)))
        # A fresh start of every file (a resumed run rewrites what it keeps, once, without repeated rounds).
        self._rewrite_appended()

    @property
    def jsonl_path(self) -> Path:
        return self.out_dir / "metrics.jsonl"

    def add_round(self, record: dict[str, Any]) -> None:
        record = clean(record)
        line = json.dumps(record)
        replaces = any(r["round"] == record["round"] for r in self.rounds)
        in_order = sorted([(r["round"], r, text) for r, text in zip(self.rounds, self._lines, strict=True)
                           if r["round"] != record["round"]] + [(record["round"], record, line)],
                          key=lambda entry: entry[0])
        self.rounds = [r for _, r, _ in in_order]
        self._lines = [text for _, _, text in in_order]
        rows = csv_rows([record])
        new_columns = _columns_of(rows, self._columns)
        if replaces or new_columns != self._columns or record is not self.rounds[-1]:
            self._columns = new_columns
            self._rewrite_appended()
        else:
            with self.jsonl_path.open("a") as fh:
                fh.write(line + "\n")
                fh.flush()
                os.fsync(fh.fileno())
            with (self.out_dir / "metrics.csv").open("a", newline="") as fh:
                csv.DictWriter(fh, fieldnames=self._columns, lineterminator="\n").writerows(rows)
        if time.monotonic() - self._json_written >= self._json_cost / JSON_MAX_SHARE:
            self.flush()

    def flush(self) -> None:
        """Bring metrics.json up to date with every recorded round (also called when the run ends)."""
        started = time.monotonic()
        write_atomic(self.out_dir / "metrics.json", '{"rounds": [\n' + ",\n".join(self._lines) + "\n]}\n")
        self._json_written = time.monotonic()
        self._json_cost = self._json_written - started

    def final_server_metrics(self) -> dict[str, Any]:
        return self.rounds[-1]["server"] if self.rounds else {}

    def save_model(self, state_dict: Mapping[str, Any]) -> Path:
        import torch  # here, not at the top: `fedpriv sweep` imports this module and should not wait for torch

        path = self.out_dir / "model.pt"
        buffer = io.BytesIO()
        torch.save(dict(state_dict), buffer)
        write_atomic(path, buffer.getvalue())
        return path

    def _rewrite_appended(self) -> None:
        write_atomic(self.jsonl_path, "".join(line + "\n" for line in self._lines))
        rows = csv_rows(self.rounds)
        self._columns = _columns_of(rows, self._columns)
        write_atomic(self.out_dir / "metrics.csv", _csv_text(rows, self._columns, header=True))


def csv_rows(rounds: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (round, source, client): source is 'server', 'train' or 'evaluate'."""
    rows: list[dict[str, Any]] = []
    for r in rounds:
        rows.append({"round": r["round"], "source": "server", "client_id": "", **r.get("server", {})})
        for source in ("train", "evaluate"):
            for entry in r.get(source, []):
                rows.append({"round": r["round"], "source": source, "client_id": entry["client_id"],
                             **entry["metrics"]})
    return rows


def _columns_of(rows: list[dict[str, Any]], known: list[str]) -> list[str]:
    columns = list(known) or ["round", "source", "client_id"]
    seen = set(columns)
    for row in rows:
        for key in row:
            if key not in seen:
                seen.add(key)
                columns.append(key)
    return columns


def _csv_text(rows: list[dict[str, Any]], columns: list[str], header: bool) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=columns, lineterminator="\n")
    if header:
        writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def metrics_csv(rounds: list[dict[str, Any]]) -> str:
    """The whole metrics.csv for `rounds`, as RunRecords leaves it."""
    rows = csv_rows(rounds)
    return _csv_text(rows, _columns_of(rows, []), header=True)
