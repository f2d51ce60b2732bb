"""User-level distributed DP (SecAgg + Skellam) against central user-level DP at the same epsilon.

    .venv/bin/python -m benchmarks.secagg_ddp_accuracy --clients 1000 --rate 0.1 --rounds 10 --epsilon 4 \
        --out benchmarks/results/secagg_ddp_accuracy.json

Both runs use Poisson client sampling at rate q, clipping norm C and the same model and data; each noise
multiplier is calibrated (bisection) so that the run's epsilon after R rounds, crediting Poisson sampling,
equals the target: central DP-FedAvg by fedpriv's user-level RDP accountant, distributed DP by the Skellam
bound (privacy/skellam.py) at the expected number of survivors q*N and its SecAgg threshold. The distributed
run's epsilon without sampling credit (what holds against the server) is reported next to it.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def bisect(f, target: float, lo: float = 0.05, hi: float = 50.0) -> float:
    """The z where the decreasing f(z) meets target."""
    for _ in range(60):
        mid = (lo * hi) ** 0.5
        lo, hi = (mid, hi) if f(mid) > target else (lo, mid)
    return hi


def calibrate(args, dim: int, threshold: int) -> dict:
    from privacy.accounting import user_level_epsilons
    from privacy.skellam import epsilon_curve, plan_skellam

    n_expected = round(args.rate * args.clients)

    def central(z: float) -> float:
        return user_level_epsilons(z, "poisson", args.rounds, args.delta, num_clients=args.clients,
                                   sample_rate=args.rate)["rdp"][-1]

    def distributed(z: float, amplified: bool = True) -> float:
        plan = plan_skellam(args.clip, z, args.bits, dim, threshold, args.clients)
        return epsilon_curve(plan, [n_expected] * args.rounds, args.delta,
                             sample_rate=args.rate if amplified else None)[-1]

    z_c = bisect(central, args.epsilon)
    z_d = bisect(distributed, args.epsilon)
    return {"z_central": z_c, "z_distributed": z_d, "epsilon_central": central(z_c),
            "epsilon_distributed_amplified": distributed(z_d),
            "epsilon_distributed_no_sampling_credit": distributed(z_d, amplified=False),
            "threshold": threshold, "expected_survivors": n_expected}


def run(flags: list[str], out: Path, timeout: float) -> dict:
    cmd = [sys.executable, "-m", "simulations.cli", "simulate", *flags, "--out", str(out)]
    started = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1:]}
    rounds = json.loads((out / "metrics.json").read_text())["rounds"]
    privacy = json.loads((out / "privacy.json").read_text())
    return {"accuracy_per_round": [r["server"].get("accuracy") for r in rounds],
            "final_accuracy": rounds[-1]["server"].get("accuracy"), "wall_s": time.perf_counter() - started,
            "epsilon_recorded": privacy["user_level"]["epsilon"],
            "secure_aggregation": {k: v for k, v in (privacy.get("secure_aggregation") or {}).items()
                                   if k != "trust_model"} or None}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, default=1000)
    p.add_argument("--rate", type=float, default=0.1)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--epsilon", type=float, default=4.0)
    p.add_argument("--delta", type=float, default=1e-5)
    p.add_argument("--clip", type=float, default=1.0)
    p.add_argument("--bits", type=int, default=32)
    p.add_argument("--shares", type=int, default=21)
    p.add_argument("--threshold", type=int, default=11)
    p.add_argument("--model", default="logreg")
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--local-epochs", type=int, default=1)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--timeout", type=float, default=1500.0)
    p.add_argument("--out", default="benchmarks/results/secagg_ddp_accuracy.json")
    args = p.parse_args(argv)

    from common import load_dataset
    from models import build_model

    dim = sum(int(v.numel()) for v in build_model(args.model, load_dataset("fashion-mnist").spec)
              .state_dict().values())
    cal = calibrate(args, dim, args.threshold)
    print(json.dumps(cal), flush=True)
    common = ["--dataset", "fashion-mnist", "--model", args.model, "--num-clients", str(args.clients),
              "--rounds", str(args.rounds), "--local-epochs", str(args.local_epochs), "--lr", str(args.lr),
              "--seed", str(args.seed), "--fraction-train", str(args.rate), "--fraction-evaluate", "0.01",
              "--dp", "user", "--client-sampling", "poisson", "--user-clipping-norm", str(args.clip),
              "--delta", str(args.delta)]
    results = {"args": vars(args), "dim": dim, "calibration": cal}
    with tempfile.TemporaryDirectory() as tmp:  # the runs' folders are outputs, not results to keep
        root = Path(tmp)
        results["central"] = run([*common, "--user-noise-multiplier", str(cal["z_central"])], root / "central",
                                 args.timeout)
        print(json.dumps(results["central"]), flush=True)
        results["distributed"] = run([*common, "--user-noise-multiplier", str(cal["z_distributed"]), "--secagg",
                                      "--secagg-shares", str(args.shares), "--secagg-threshold",
                                      str(args.threshold), "--secagg-bits", str(args.bits)],
                                     root / "distributed", args.timeout)
        print(json.dumps(results["distributed"]), flush=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
