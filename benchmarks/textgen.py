"""A federated character language model that writes: Shakespeare, natural clients (the largest roles),
without DP and with sample-level DP; held-out-role perplexity and a sample of each, side by side.

    python -m benchmarks.textgen --model transformer --clients 4 --rounds 2 --epsilon 8 \
        --out benchmarks/results/textgen.json
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from client.textgen import DEFAULT_PROMPT, generate, held_out_windows, load_run_model, perplexity
from simulations.runconfig import resolve
from simulations.simulate import simulate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="transformer")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--local-epochs", type=int, default=1)
    parser.add_argument("--lr", type=float, default=0.003)
    parser.add_argument("--epsilon", type=float, default=8.0)
    parser.add_argument("--held-out", type=int, default=3000, help="held-out windows for perplexity")
    parser.add_argument("--variants", default="none,sample")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default="cpu", help="where clients and the server train and evaluate")
    parser.add_argument("--work", default="/tmp/fedpriv-textgen")
    parser.add_argument("--out", default="benchmarks/results/textgen.json")
    args = parser.parse_args()
    results = []
    for dp in args.variants.split(","):
        keys = {"dataset": "shakespeare", "model": args.model, "partition": "natural", "num-clients": args.clients,
                "num-rounds": args.rounds, "local-epochs": args.local_epochs, "optimizer": "adam",
                "learning-rate": args.lr, "batch-size": args.batch_size, "fraction-evaluate": 0.25,
                "device": args.device,
                "out-dir": str(Path(args.work) / f"{args.model}-{dp}")}
        if dp == "sample":
            keys.update({"dp": "sample", "target-epsilon": args.epsilon, "delta": 1e-5, "max-grad-norm": 1.0})
        started = time.perf_counter()
        out = simulate(resolve(None, keys))
        seconds = time.perf_counter() - started
        run = load_run_model(out)
        x, y, what = held_out_windows(run.run_config, args.held_out)
        rounds = json.loads((out / "metrics.json").read_text())["rounds"]
        privacy = out / "privacy.json"
        epsilon = None
        if privacy.exists():
            epsilon = max(c["epsilon"] for c in json.loads(privacy.read_text())["sample_level"]["clients"])
        results.append({
            "dp": dp, "epsilon": epsilon, "model": args.model,
            "held_out_perplexity": perplexity(run.model, x, y), "held_out": f"{len(y)} windows of {what}",
            "server_test_accuracy": rounds[-1]["server"]["accuracy"],
            "server_test_perplexity": float(2.718281828459045 ** rounds[-1]["server"]["loss"]),
            "sample": DEFAULT_PROMPT + generate(run.model, DEFAULT_PROMPT, 300, 0.8, 0),
            "seconds": round(seconds, 1),
        })
        print(json.dumps(results[-1]), flush=True)
    meta = {k: getattr(args, k) for k in ("model", "clients", "rounds", "local_epochs", "lr", "epsilon",
                                          "batch_size", "device")}
    meta["load_average"] = os.getloadavg()
    Path(args.out).write_text(json.dumps({"setup": meta, "results": results}, indent=1))


if __name__ == "__main__":
    main()
