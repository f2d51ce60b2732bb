"""The cost of a secure aggregation round against a plain one, on the in-process engine.

    .venv/bin/python -m benchmarks.secagg_cost --clients 10 100 --rounds 2 \
        --out benchmarks/results/secagg_cost.json

The same workload (Fashion-MNIST, a class-stratified subset, the 421k-parameter CNN, one local epoch) runs as
plain FedAvg, as SecAgg (complete graph: every client shares with every other) and as SecAgg+ (a sparse graph
of `--sparse-shares` holders per client), and optionally with distributed DP on top. Each run is a fresh
process; the per-round time is the run's own record (metrics.json `seconds`, rounds 1..R), so imports and
the round-0 evaluation are excluded. Variants are interleaved per client count.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VARIANTS = {
    "plain": [],
    "secagg": ["--secagg"],
    "secagg+": ["--secagg", "--secagg-shares", "{shares}"],
    "secagg+ddp": ["--secagg", "--secagg-shares", "{shares}", "--dp", "user", "--client-sampling", "fixed",
                   "--user-noise-multiplier", "1.0"],
}


def run_variant(variant: str, clients: int, rounds: int, data_dir: str, shares: int, out: Path,
                timeout: float) -> dict:
    flags = [f.format(shares=shares) for f in VARIANTS[variant]]
    cmd = [sys.executable, "-m", "simulations.cli", "simulate", "--dataset", "fashion-mnist", "--data-dir", data_dir,
           "--model", "cnn", "--num-clients", str(clients), "--rounds", str(rounds), "--fraction-evaluate", "0.1",
           "--out", str(out), *flags]
    started = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"variant": variant, "clients": clients, "error": f"timed out after {timeout:.0f} s"}
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        return {"variant": variant, "clients": clients, "error": proc.stderr.strip().splitlines()[-1:]}
    rounds_rec = json.loads((out / "metrics.json").read_text())["rounds"][1:]
    seconds = [r["seconds"] for r in rounds_rec]
    return {"variant": variant, "clients": clients, "round_seconds": seconds,
            "median_round_s": statistics.median(seconds), "process_wall_s": wall,
            "accuracy": rounds_rec[-1]["server"].get("accuracy"),
            "released": [bool((r.get("secagg") or {"released": True})["released"]) for r in rounds_rec]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, nargs="+", default=[10, 100])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--variants", nargs="+", default=["plain", "secagg", "secagg+"], choices=list(VARIANTS))
    p.add_argument("--sparse-shares", type=int, default=11)
    p.add_argument("--max-train", type=int, default=2000)
    p.add_argument("--max-test", type=int, default=1000)
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per run")
    p.add_argument("--out", default="benchmarks/results/secagg_cost.json")
    args = p.parse_args(argv)

    from simulations.subsets import subset_data_dir

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = subset_data_dir("fashion-mnist", "", args.max_train, args.max_test, Path(tmp))
        for clients in args.clients:
            for variant in args.variants:
                if variant == "secagg+" and args.sparse_shares >= clients:
                    continue  # the sparse graph would be complete: the same as secagg
                res = run_variant(variant, clients, args.rounds, data_dir, args.sparse_shares,
                                  Path(tmp) / f"{variant}-{clients}", args.timeout)
                print(json.dumps(res), flush=True)
                results.append(res)
    for clients in args.clients:
        base = next((r for r in results if r["clients"] == clients and r["variant"] == "plain" and "error" not in r),
                    None)
        for r in results:
            if r["clients"] == clients and base and "error" not in r:
                r["ratio_to_plain"] = r["median_round_s"] / base["median_round_s"]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"args": vars(args), "results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
