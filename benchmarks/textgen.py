"""A federated character language model that writes: Shakespeare, natural clients (the largest roles),
without DP and with sample-level DP; held-out-role perplexity and a sample of each, side by side.

    python -m benchmarks.textgen --model ngram --clients 100 --rounds 12 --epsilon 8 \
        --out benchmarks/results/textgen_ngram.json

DP runs may take their own batch size and learning rate (--dp-batch-size, --dp-lr): larger Poisson batches
cut the noise per example that DP-SGD adds, so the best private setting differs from the non-private one.
The variant `central` is the centralized baseline (simulations/centralized.py): one node holding the same
clients' text, one pass over it per round, the same model and settings.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from common.textgen import DEFAULT_PROMPT, generate, held_out_windows, load_run_model, perplexity
from simulations.cells import Cell, run_cell
from simulations.centralized import centralized_run
from simulations.runconfig import resolve
from simulations.simulate import simulate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="transformer")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--partition", default="natural",
                        help="natural: the largest (play, role) clients; iid: the whole corpus split evenly")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--local-epochs", type=int, default=1)
    parser.add_argument("--lr", type=float, default=0.003)
    parser.add_argument("--epsilon", type=float, default=8.0)
    parser.add_argument("--held-out", type=int, default=3000, help="held-out windows for perplexity")
    parser.add_argument("--variants", default="none,sample", help="none, sample (DP-SGD), central (one node)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--text-stride", type=int, default=20,
                        help="characters between training windows (run-config text-stride): 4 gives 5x the targets")
    parser.add_argument("--dp-batch-size", type=int, default=None, help="DP runs' batch size (default --batch-size)")
    parser.add_argument("--dp-lr", type=float, default=None, help="DP runs' learning rate (default --lr)")
    parser.add_argument("--max-grad-norm", type=float, default=1.0)
    parser.add_argument("--strategy", default="fedavg", help="e.g. fedavgm: server momentum speeds up many clients")
    parser.add_argument("--server-lr", type=float, default=1.0, help="server learning rate (fedavgm, fedadam...)")
    parser.add_argument("--server-momentum", type=float, default=0.9)
    parser.add_argument("--temperatures", default="0.8,0.5", help="a 300-character sample at each")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the machine is shared)")
    parser.add_argument("--device", default="cpu", help="where clients and the server train and evaluate")
    parser.add_argument("--work", default="/tmp/fedpriv-textgen")
    parser.add_argument("--out", default="benchmarks/results/textgen.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = []
    for dp in args.variants.split(","):
        keys = {"dataset": "shakespeare", "model": args.model, "partition": args.partition, "num-clients": args.clients,
                "num-rounds": args.rounds, "local-epochs": args.local_epochs, "optimizer": "adam",
                "learning-rate": args.lr, "batch-size": args.batch_size, "fraction-evaluate": 0.25,
                "device": args.device, "strategy": args.strategy, "server-learning-rate": args.server_lr,
                "server-momentum": args.server_momentum, "text-stride": args.text_stride,
                "out-dir": str(Path(args.work) / "-".join(
                    [args.model, *([f"stride{args.text_stride}"] if args.text_stride != 20 else []),
                     *([args.partition] if args.partition != "natural" else []), dp]))}
        if dp == "sample":
            keys.update({"dp": "sample", "target-epsilon": args.epsilon, "delta": 1e-5,
                         "max-grad-norm": args.max_grad_norm, "batch-size": args.dp_batch_size or args.batch_size,
                         "learning-rate": args.dp_lr or args.lr})
        started = time.perf_counter()
        federated = resolve(None, keys)
        out = _run(federated, dp == "central", Path(args.work) / "data")
        seconds = time.perf_counter() - started
        run = load_run_model(out)
        # The federated run's held-out roles, also for `central` (whose own config has one client).
        x, y, what = held_out_windows(federated, args.held_out)
        rounds = json.loads((out / "metrics.json").read_text())["rounds"]
        privacy = out / "privacy.json"
        epsilon = None
        if privacy.exists():
            epsilon = max(c["epsilon"] for c in json.loads(privacy.read_text())["sample_level"]["clients"])
        results.append({
            "dp": dp, "epsilon": epsilon, "model": args.model, "batch_size": keys["batch-size"],
            "learning_rate": keys["learning-rate"],
            "held_out_perplexity": perplexity(run.model, x, y), "held_out": f"{len(y)} windows of {what}",
            "server_test_accuracy": rounds[-1]["server"]["accuracy"],
            "server_test_perplexity": float(2.718281828459045 ** rounds[-1]["server"]["loss"]),
            "samples": {t: DEFAULT_PROMPT + generate(run.model, DEFAULT_PROMPT, 300, float(t), 0)
                        for t in args.temperatures.split(",")},
            "server_test_accuracy_by_round": [r["server"]["accuracy"] for r in rounds],
            "seconds": round(seconds, 1),
        })
        print(json.dumps(results[-1]), flush=True)
        _write(args, results)  # after each variant: a long DP run that is stopped keeps the finished one


def _run(run_config: dict, central: bool, data_root: Path) -> Path:
    if not central:
        return simulate(run_config)
    central_config, nodes = centralized_run(run_config, data_root)
    cell = Cell("central", {}, central_config, nodes)
    run_cell(cell)
    return cell.run_dir


def _write(args: argparse.Namespace, results: list[dict]) -> None:
    meta = {k: getattr(args, k) for k in ("model", "clients", "rounds", "local_epochs", "lr", "epsilon",
                                          "batch_size", "dp_batch_size", "dp_lr", "max_grad_norm", "strategy",
                                          "server_lr", "server_momentum", "held_out", "threads", "device",
                                          "text_stride", "partition")}
    meta["load_average"] = os.getloadavg()
    Path(args.out).write_text(json.dumps({"setup": meta, "results": results}, indent=1))


if __name__ == "__main__":
    main()
