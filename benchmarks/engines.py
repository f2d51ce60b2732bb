"""Engine overhead: the same federated workload on the in-process engine, on Flower's Ray runtime, and as a
plain loop with no Flower at all (the same local training steps, FedAvg and evaluations, by hand).

    .venv/bin/python -m benchmarks.engines --clients 10 50 --rounds 5 --out benchmarks/results/engines.json

Each variant runs in a fresh process; we record the run's own time (from the start of training to the last
record; imports and interpreter start excluded), the whole process's wall time, and the peak RSS of its
process tree (Ray's workers included). Ratios are against the plain loop of the same run.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

VARIANTS = ("plain", "inprocess", "ray")


def workload(num_clients: int, rounds: int, out_dir: str) -> dict:
    from simulations.runconfig import resolve

    return resolve(None, {"dataset": "fashion-mnist", "model": "cnn", "num-clients": num_clients,
                          "num-rounds": rounds, "out-dir": out_dir})


def plain_loop(rc: dict) -> float:
    """What the federated run computes, without Flower: returns the final server accuracy."""
    import numpy as np
    import torch

    from common import evaluate, load_dataset, partition_data, train
    from common.task import client_seed
    from models import build_model
    from server.rounds import sample_clients
    from simulations.runconfig import validate

    cfg = validate(rc)
    dataset = load_dataset(cfg.data.dataset)
    model = build_model(cfg.train.model, dataset.spec, seed=cfg.server.seed)
    global_state = {k: v.clone() for k, v in model.state_dict().items()}
    clients = [str(i) for i in range(cfg.data.num_clients)]
    evaluate(model, dataset.x_test, dataset.y_test)
    accuracy = 0.0
    for server_round in range(1, cfg.server.num_rounds + 1):
        states, weights = [], []
        for cid in sample_clients(clients, cfg.server.fraction_train, cfg.server.seed, server_round, "train"):
            data = partition_data(cfg.data, int(cid))
            local = build_model(cfg.train.model, data.spec)
            local.load_state_dict(global_state)
            train(local, data.x_train, data.y_train, cfg.train, seed=client_seed(cfg.data.seed, server_round, cid))
            states.append(local.state_dict())
            weights.append(data.num_examples)
        share = np.asarray(weights, dtype=np.float64) / sum(weights)
        global_state = {k: sum(float(w) * s[k] for w, s in zip(share, states, strict=True)) for k in global_state}
        model.load_state_dict(global_state)
        for cid in sample_clients(clients, cfg.server.fraction_evaluate, cfg.server.seed, server_round, "evaluate"):
            data = partition_data(cfg.data, int(cid))
            evaluate(model, data.x_val, data.y_val)
        accuracy = evaluate(model, dataset.x_test, dataset.y_test)["accuracy"]
    torch.save(global_state, Path(cfg.server.out_dir) / "model.pt")
    return accuracy


def run_one(variant: str, num_clients: int, rounds: int, result_file: str) -> None:
    logging.getLogger("flwr").setLevel(logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        rc = workload(num_clients, rounds, tmp)
        from simulations.simulate import simulate

        if variant == "plain":
            Path(tmp).mkdir(exist_ok=True)
            import common  # noqa: F401  imports before the clock starts, as for the engines
            started = time.perf_counter()
            accuracy = plain_loop(rc)
        else:
            import client.app  # noqa: F401
            import server.app  # noqa: F401
            started = time.perf_counter()
            simulate(rc, variant)
            rounds_done = json.loads((Path(tmp) / "metrics.json").read_text())["rounds"]
            accuracy = rounds_done[-1]["server"]["accuracy"]
        seconds = time.perf_counter() - started
    Path(result_file).write_text(json.dumps({"run_seconds": seconds, "accuracy": accuracy}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, nargs="+", default=[10, 50])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--out", default="benchmarks/results/engines.json")
    parser.add_argument("--one", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        run_one(args.one, args.clients[0], args.rounds, args.result)
        return

    from benchmarks.procmem import run_measured

    rows = []
    for n in args.clients:
        for variant in args.variants:
            with tempfile.NamedTemporaryFile(suffix=".json") as result:
                cmd = [sys.executable, "-m", "benchmarks.engines", "--one", variant, "--clients", str(n),
                       "--rounds", str(args.rounds), "--result", result.name]
                code, wall, peak = run_measured(cmd)
                if code != 0:
                    raise SystemExit(f"{variant} with {n} clients failed (exit {code})")
                measured = json.loads(Path(result.name).read_text())
            rows.append({"clients": n, "variant": variant, "run_seconds": round(measured["run_seconds"], 2),
                         "process_seconds": round(wall, 2), "peak_rss_mb": round(peak / 2**20),
                         "accuracy": round(measured["accuracy"], 4)})
            print(json.dumps(rows[-1]), flush=True)
    for row in rows:
        base = next(r for r in rows if r["clients"] == row["clients"] and r["variant"] == "plain")
        row["time_vs_plain"] = round(row["run_seconds"] / base["run_seconds"], 3)
        row["memory_vs_plain"] = round(row["peak_rss_mb"] / base["peak_rss_mb"], 3)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"rounds": args.rounds, "rows": rows}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
