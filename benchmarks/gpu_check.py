"""The same simulation on the CPU and on CUDA, side by side: final accuracy and time.

    .venv/bin/python -m benchmarks.gpu_check                        # Fashion-MNIST CNN, 10 clients, 3 rounds
    .venv/bin/python -m benchmarks.gpu_check --dp                   # the same with sample-level DP-SGD
    .venv/bin/python -m benchmarks.gpu_check --dataset digits --model mlp --rounds 10

Without a CUDA device it says so and exits 0 (nothing to compare). The two runs share every setting and seed;
a GPU's sums differ from the CPU's in the last bits, so accuracies agree to about a point, not exactly. It exits 1
when a client reply was dropped on either device or the accuracies differ by more than MAX_ACCURACY_GAP.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

# The same seeded job on two devices differs only in the last bits of its sums: a point or two of accuracy.
MAX_ACCURACY_GAP = 0.05


def run_once(device: str, args: argparse.Namespace, out: Path) -> dict:
    from simulations.runconfig import resolve
    from simulations.simulate import simulate

    overrides = {"dataset": args.dataset, "model": args.model, "num-clients": args.num_clients,
                 "num-rounds": args.rounds, "device": device, "out-dir": str(out / device), "seed": 42}
    if args.dp:
        overrides.update({"dp": "sample", "noise-multiplier": 1.0, "max-grad-norm": 1.0, "batch-size": 256,
                          "learning-rate": 0.5, "momentum": 0.5})
    config = resolve(None, overrides)
    started = time.perf_counter()
    run_dir = simulate(config)
    seconds = time.perf_counter() - started
    rounds = json.loads((run_dir / "metrics.json").read_text())["rounds"]
    dropped = [d for r in rounds for d in r.get("dropped", [])]
    return {"device": device, "seconds": round(seconds, 1), "accuracy": round(rounds[-1]["server"]["accuracy"], 4),
            "dropped_replies": len(dropped), "first_drop": dropped[0]["reason"] if dropped else None}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="fashion-mnist")
    parser.add_argument("--model", default="cnn")
    parser.add_argument("--num-clients", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dp", action="store_true", help="sample-level DP-SGD (Opacus) on both devices")
    parser.add_argument("--out", help="write the two rows as JSON here")
    args = parser.parse_args()

    import torch

    if not torch.cuda.is_available():
        print(f"no CUDA device here (torch {torch.__version__}, CUDA build: {torch.version.cuda or 'none'}); "
              "nothing to compare. Run this on a machine with a GPU.")
        return 0
    logging.getLogger("flwr").setLevel(logging.WARNING)
    print(f"GPU: {torch.cuda.get_device_name(0)}")
    with tempfile.TemporaryDirectory(prefix="fedpriv-gpu-check-") as tmp:
        rows = [run_once(device, args, Path(tmp)) for device in ("cpu", "cuda")]
    cpu, gpu = rows
    for row in rows:
        print(json.dumps(row))
    print(f"cuda vs cpu: {cpu['seconds'] / max(gpu['seconds'], 1e-9):.2f}x faster, accuracy "
          f"{gpu['accuracy']:.4f} vs {cpu['accuracy']:.4f} ({gpu['accuracy'] - cpu['accuracy']:+.4f})")
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))
    # A client that fails on one device is dropped and the run goes on with the model unchanged: say so, and
    # fail, rather than print a speed-up of work that was never done.
    for row in rows:
        if row["dropped_replies"]:
            print(f"FAILED: on {row['device']}, {row['dropped_replies']} client replies were dropped; the first: "
                  f"{row['first_drop']}")
            return 1
    if abs(gpu["accuracy"] - cpu["accuracy"]) > MAX_ACCURACY_GAP:
        print(f"FAILED: the accuracies differ by more than {MAX_ACCURACY_GAP}: the devices did not do the same work")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
