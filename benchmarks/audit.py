"""Empirical audit table: accountant epsilon against the one-run canary lower bound, per level and epsilon.

    python -m benchmarks.audit [--levels sample,user] [--canaries 1000] [--out FILE.json] [--work DIR]

Sample level: Fashion-MNIST subset (3000 training, 1000 test images, class-stratified, seeded), MLP, 5 clients,
2 rounds, DP-SGD on every client with the
noise calibrated for a target epsilon over the run; canaries hosted by client 0. "No DP" is the same run with
noise multiplier 1e-3 (clipping kept): what the canaries show when almost nothing protects them.
User level: the same subset over 100 small clients (30 images each), logistic regression, 5 rounds,
DP-FedAvg with Poisson client sampling (rate 0.2); the noise
multiplier is calibrated here for each target epsilon with fedpriv's own accountant; "no DP" there is noise
multiplier 0.3 (epsilon ~40).
Each row = one training run (the run the audit re-runs) + one audited run; `seconds` is the audited run.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

from privacy import user_level_epsilons
from simulations.audit import run_audit
from simulations.runconfig import resolve
from simulations.simulate import simulate
from simulations.subsets import subset_data_dir

TARGETS = (1.0, 3.0, 8.0, None)  # None = no DP (noise multiplier ~0)
DELTA = 1e-5
TRAIN_EXAMPLES = 3000  # the machine is shared by several jobs: each run must stay at a few minutes


def user_noise_for(epsilon: float, rounds: int, rate: float, clients: int) -> float:
    """Smallest user-level noise multiplier (bisection) whose accounted epsilon after `rounds` is <= epsilon."""
    lo, hi = 0.3, 50.0
    for _ in range(12):
        mid = (lo + hi) / 2
        eps = user_level_epsilons(mid, "poisson", rounds, DELTA, num_clients=clients, sample_rate=rate)["rdp"][-1]
        lo, hi = (mid, hi) if eps > epsilon else (lo, mid)
    return hi


def sample_config(data_dir: str, target: float | None, out: Path) -> dict[str, Any]:
    dp = {"target-epsilon": target} if target else {"noise-multiplier": 1e-3}
    return resolve(None, {"dataset": "fashion-mnist", "data-dir": data_dir, "model": "mlp", "num-clients": 5,
                          "num-rounds": 2, "batch-size": 64, "learning-rate": 0.1, "momentum": 0.5,
                          "dp": "sample", "delta": DELTA, "out-dir": str(out), **dp})


def user_config(data_dir: str, target: float | None, out: Path, rounds: int, rate: float,
                clients: int) -> dict[str, Any]:
    # "No DP" at user level is noise multiplier 0.3 (accountant epsilon ~40): fedpriv's PLD accountant, run
    # beside RDP for every user-level record, runs out of memory on smaller noise.
    z = user_noise_for(target, rounds, rate, clients) if target else 0.3
    # Logistic regression (7,850 weights): every canary client's direction spans the whole model, and with
    # the MLP (235k weights) one audited run took over 10 minutes on the shared machine.
    return resolve(None, {"dataset": "fashion-mnist", "data-dir": data_dir, "model": "logreg",
                          "num-clients": clients, "num-rounds": rounds, "fraction-train": rate,
                          "fraction-evaluate": 0.1, "batch-size": 32, "learning-rate": 0.05,
                          "dp": "user", "user-noise-multiplier": z, "user-clipping-norm": 1.0,
                          "client-sampling": "poisson", "delta": DELTA, "out-dir": str(out)})


def one(level: str, config: dict[str, Any], canaries: int) -> dict[str, Any]:
    out = Path(config["out-dir"])
    simulate(config)
    started = time.perf_counter()
    record = run_audit(out, canaries=canaries, confidence=0.95, seed=0)
    row = {k: record[k] for k in ("level", "accountant_epsilon", "canaries", "guesses", "correct",
                                   "epsilon_lower_bound", "epsilon_estimate", "auroc", "tpr_at_1pct_fpr",
                                   "best_possible_bound", "verdict", "seconds")}
    row["total_seconds"] = time.perf_counter() - started
    row["noise_multiplier"] = (config["user-noise-multiplier"] if level == "user" else
                               json.loads((out / "privacy.json").read_text())["sample_level"]["clients"][0][
                                   "noise_multiplier"])
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/audit.json")
    parser.add_argument("--work", default="/tmp/fedpriv-audit")
    parser.add_argument("--canaries", type=int, default=1000)
    parser.add_argument("--levels", default="sample,user")
    args = parser.parse_args()
    logging.getLogger("flwr").setLevel(logging.WARNING)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    data_dir = subset_data_dir("fashion-mnist", "", TRAIN_EXAMPLES, 1000, work / "data")
    rows = []
    for level in args.levels.split(","):
        for target in TARGETS:
            name = f"{level}-{'nodp' if target is None else f'eps{target:g}'}"
            config = (sample_config(data_dir, target, work / name) if level == "sample" else
                      user_config(data_dir, target, work / name, rounds=5, rate=0.2, clients=100))
            row = {"name": name, "target_epsilon": target, **one(level, config, args.canaries)}
            rows.append(row)
            print(json.dumps(row), flush=True)
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps({"load": os.getloadavg(), "rows": rows}, indent=1) + "\n")
    print("| level | target eps | accountant eps | m | bound | estimate | AUROC | seconds |")
    for r in rows:
        est = r["epsilon_estimate"]
        print(f"| {r['level']} | {r['target_epsilon'] or 'no DP'} | {r['accountant_epsilon']:.3g} | {r['canaries']} | "
              f"{r['epsilon_lower_bound']:.3g} | {'inf' if est is None or math.isinf(est) else f'{est:.3g}'} | "
              f"{r['auroc']:.3f} | {r['seconds']:.0f} |")


if __name__ == "__main__":
    main()
