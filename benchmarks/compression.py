"""Compressed updates on Fashion-MNIST (CNN, IID clients): bytes sent per round and final accuracy of
float32, int8 and top-k updates, side by side in one process on one (class-stratified) subset.

    python -m benchmarks.compression --train 12000 --test 2000 --rounds 6 --out benchmarks/results/compression.json
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from simulations.runconfig import resolve
from simulations.simulate import simulate
from simulations.subsets import subset_data_dir

CODECS = ("none", "int8", "topk:0.01")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=12000)
    parser.add_argument("--test", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--codecs", default=",".join(CODECS))
    parser.add_argument("--work", default="/tmp/fedpriv-compression")
    parser.add_argument("--out", default="benchmarks/results/compression.json")
    args = parser.parse_args()
    work = Path(args.work)
    data_dir = subset_data_dir("fashion-mnist", "", args.train, args.test, work / "data")
    results = []
    for codec in args.codecs.split(","):
        rc = resolve(None, {"dataset": "fashion-mnist", "data-dir": data_dir, "model": "cnn",
                            "num-clients": args.clients, "num-rounds": args.rounds, "compress": codec,
                            "out-dir": str(work / codec.replace(":", "-"))})
        started = time.perf_counter()
        out = simulate(rc)
        seconds = time.perf_counter() - started
        rounds = json.loads((out / "metrics.json").read_text())["rounds"]
        trained = [r for r in rounds if r["round"] > 0]
        results.append({
            "compress": codec,
            "upload_bytes_per_round": trained[-1]["upload_bytes"],
            "dense_bytes_per_round": trained[-1]["dense_bytes"],
            "ratio": trained[-1]["upload_bytes"] / trained[-1]["dense_bytes"],
            "accuracy_per_round": [round(r["server"]["accuracy"], 4) for r in rounds],
            "final_accuracy": rounds[-1]["server"]["accuracy"],
            "seconds": round(seconds, 1),
        })
        print(json.dumps(results[-1]), flush=True)
    meta = {"train": args.train, "test": args.test, "rounds": args.rounds, "clients": args.clients,
            "load_average": os.getloadavg()}
    Path(args.out).write_text(json.dumps({"setup": meta, "results": results}, indent=1))


if __name__ == "__main__":
    main()
