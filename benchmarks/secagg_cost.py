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


def protocol_only(clients: int, shares: int, dim: int, bits: int = 32) -> dict:
    """The SecAgg+ protocol alone, all clients in this process (no training, no Flower): the seconds each
    stage adds to a round, summed over clients (on one machine the clients' work is serial)."""
    import numpy as np

    from client.secagg import respond
    from common.secagg_crypto import to_ring
    from server.secagg_protocol import ProtocolSettings, run_protocol

    nodes = list(range(2, clients + 2))
    rng = np.random.default_rng(0)
    inputs = {n: to_ring(rng.integers(-1000, 1000, dim), bits) for n in nodes}
    states: dict[int, dict] = {n: {} for n in nodes}
    spent = {"setup": 0.0, "share": 0.0, "collect": 0.0, "unmask": 0.0}

    def transport(stage: str, requests: dict) -> dict:
        started = time.perf_counter()
        replies = {n: {**respond(stage, r, states[n], lambda _r, n=n: inputs[n]), "stage": stage,
                       "round": r["round"]} for n, r in requests.items()}
        spent[stage] += time.perf_counter() - started
        return replies

    holders = 0 if shares >= clients else shares
    threshold = max(2, (clients if not holders else holders) // 2 + 1)
    started = time.perf_counter()
    out = run_protocol(1, nodes, ProtocolSettings(holders, threshold, bits, 0), transport, {}, dim)
    total = time.perf_counter() - started
    return {"clients": clients, "shares": holders or clients, "dim": dim, "total_s": total,
            "clients_s": spent, "server_s": total - sum(spent.values()), "released": out.total is not None}


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
    p.add_argument("--complete-max", type=int, default=50, help="protocol-only: largest complete graph timed")
    p.add_argument("--protocol-only", action="store_true",
                   help="time the protocol alone (421,642 values, the CNN's size), complete and sparse graphs")
    args = p.parse_args(argv)
    if args.protocol_only:
        rows = []
        for clients in args.clients:
            for shares in sorted({clients, args.sparse_shares}):
                if shares > clients or (shares == clients and clients > args.complete_max):
                    continue  # the complete graph's cost grows as clients^2: see the 10-client row
                rows.append(protocol_only(clients, shares, 421_642))
                print(json.dumps(rows[-1]), flush=True)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"args": vars(args), "results": rows}, indent=2) + "\n")
        return 0

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
