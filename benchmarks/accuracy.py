"""Accuracy runs: each checked-in config in benchmarks/configs/ as one `fedpriv simulate`, summarised.

    .venv/bin/python -m benchmarks.accuracy [NAME ...] --out benchmarks/results/accuracy.json

Each run's records stay in runs/bench/NAME (metrics.json, privacy.json and the privacy report for DP runs).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from simulations.cli import main as fedpriv

CONFIGS = Path(__file__).parent / "configs"


def run_config(name: str, runs_dir: Path) -> dict:
    out = runs_dir / name
    started = time.perf_counter()
    code = fedpriv(["simulate", "--config", str(CONFIGS / f"{name}.toml"), "--out", str(out)])
    seconds = time.perf_counter() - started
    if code != 0:
        return {"config": name, "error": f"exit {code}"}
    rounds = json.loads((out / "metrics.json").read_text())["rounds"]
    row = {"config": name, "rounds": rounds[-1]["round"], "final_accuracy": round(rounds[-1]["server"]["accuracy"], 4),
           "best_accuracy": round(max(r["server"]["accuracy"] for r in rounds), 4),
           "final_f1_macro": round(rounds[-1]["server"]["f1_macro"], 4), "seconds": round(seconds, 1)}
    privacy = out / "privacy.json"
    if privacy.exists():
        clients = json.loads(privacy.read_text())["sample_level"]["clients"]
        row["max_client_epsilon"] = round(max(c["epsilon"] for c in clients), 4)
        row["noise_multiplier"] = round(clients[0]["noise_multiplier"], 4)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", help="config names (default: all in benchmarks/configs)")
    parser.add_argument("--runs-dir", default="runs/bench")
    parser.add_argument("--out", default="benchmarks/results/accuracy.json")
    args = parser.parse_args()
    names = args.names or sorted(p.stem for p in CONFIGS.glob("*.toml"))
    out = Path(args.out)
    rows = json.loads(out.read_text())["rows"] if out.exists() else []
    for name in names:
        row = run_config(name, Path(args.runs_dir))
        rows = [r for r in rows if r["config"] != name] + [row]
        print(json.dumps(row), flush=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"rows": rows}, indent=1))


if __name__ == "__main__":
    main()
