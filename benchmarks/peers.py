"""fedpriv against Apple's pfl-research (PyPI `pfl==0.6.0`), the same work side by side on this machine.

    python -m benchmarks.peers --install                      # benchmarks/.pfl-venv: pfl 0.6.0, torch 2.13.0 CPU
    python -m benchmarks.peers --workloads B C --repeats 3 --out benchmarks/results/peers.json

pfl needs dp-accounting < 0.6 (fedpriv uses 0.6.0), so it gets its own venv under benchmarks/ (git-ignored),
with torch pinned as in the Makefile. This script writes the pfl program itself (PFL_SCRIPT below): the same
model shapes, the same clients' examples (fedpriv computes the split and hands pfl the indices), the same
optimizer, cohorts and evaluation (a client cohort on held-out data plus the central test set, every round).

Workloads (issue 12):
  A  FMNIST cnn, 10 IID clients, all every round, 5 rounds
  B  FMNIST mlp, 1000 clients (54 train + 6 held-out each), 50 train + 50 evaluate a round, 20 rounds
  C  B + user-level DP (z 1.0, C 1.0): fedpriv samples Poisson and accounts what it simulates; pfl runs a
     fixed cohort of 50 (its Poisson accounting is nominal)
  D  FMNIST mlp, 10,000 clients (5 train + 1 held-out each), 100 train + 100 evaluate a round, 20 rounds

Each (workload, engine) runs in a fresh process, interleaved over the repeats; we record the per-round time
(training rounds only: from the first round's start to the last one's end, over the rounds), the median of
rounds 2..R (the steady pace, without round 1's one-time costs), the process's wall time, and the peak RSS
of its process tree. Threads: `--threads` (OMP_NUM_THREADS and torch's own
count, the same for every engine); malloc thresholds: MALLOC_ENV, the same for every engine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
VENV = HERE / ".pfl-venv"
PFL = "pfl[pytorch]==0.6.0"
TORCH = "torch==2.13.0"  # as in the Makefile

WORKLOADS: dict[str, dict] = {
    "A": {"model": "cnn", "num-clients": 10, "fraction-train": 1.0, "fraction-evaluate": 1.0, "num-rounds": 5},
    "B": {"model": "mlp", "num-clients": 1000, "fraction-train": 0.05, "fraction-evaluate": 0.05,
          "num-rounds": 20},
    "C": {"model": "mlp", "num-clients": 1000, "fraction-train": 0.05, "fraction-evaluate": 0.05,
          "num-rounds": 20, "dp": "user", "user-noise-multiplier": 1.0, "user-clipping-norm": 1.0,
          "client-sampling": "poisson"},
    "D": {"model": "mlp", "num-clients": 10000, "fraction-train": 0.01, "fraction-evaluate": 0.01,
          "num-rounds": 20},
}
ENGINES = ("pfl", "inprocess", "ray")
# fedpriv's training sets these malloc thresholds itself (common/allocator.py: without them glibc hands freed
# memory back after every step and the next step page-faults it in again); every engine gets them here, so
# pfl and Ray run under the same allocator as fedpriv's in-process engine.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(32 << 20), "MALLOC_TRIM_THRESHOLD_": str(1 << 30)}


def install() -> Path:
    """benchmarks/.pfl-venv with pfl 0.6.0 and torch 2.13.0 (CPU, the local wheel pip is configured for)."""
    python = VENV / "bin" / "python"
    if not python.exists():
        subprocess.run([getattr(sys, "_base_executable", sys.executable), "-m", "venv", str(VENV)], check=True)
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as pins:
        pins.write(f"{TORCH}\n")
    pip = [str(python), "-m", "pip", "install", "-q", "-c", pins.name]
    subprocess.run([*pip, TORCH], check=True)
    subprocess.run([*pip, PFL], check=True)
    os.unlink(pins.name)
    return python


# The pfl program. It reads the data and the split that fedpriv wrote (split.npz); its result goes to cfg["result"].
PFL_SCRIPT = r'''
import json, sys, time
import numpy as np
import torch
from torch import nn

cfg = json.loads(sys.argv[1])
torch.set_num_threads(cfg["threads"])
np.random.seed(cfg["seed"]); torch.manual_seed(cfg["seed"])
from pfl.aggregate.simulate import SimulatedBackend
from pfl.algorithm import FederatedAveraging, NNAlgorithmParams
from pfl.callback.base import TrainingProcessCallback
from pfl.callback.central_evaluation import CentralEvaluationCallback
from pfl.data.dataset import Dataset
from pfl.data.federated_dataset import FederatedDataset
from pfl.data.sampling import get_user_sampler
from pfl.hyperparam import NNEvalHyperParams, NNTrainHyperParams
from pfl.metrics import Metrics, Weighted
from pfl.model.pytorch import PyTorchModel

data = np.load(cfg["split"])
x_all, y_all = np.load(cfg["x_train"], mmap_mode="r"), data["y_train"]
offsets, train_idx, val_idx, val_offsets = data["offsets"], data["train_idx"], data["val_idx"], data["val_offsets"]
users = [str(i) for i in range(len(offsets) - 1)]


class Peer(nn.Module):
    def forward(self, x):
        return self.net(x)

    def loss(self, x, y, eval=False):
        self.eval() if eval else self.train()
        return nn.functional.cross_entropy(self(x), y.long())

    @torch.no_grad()
    def metrics(self, x, y, eval=True):
        self.eval()
        logits = self(x)
        n = len(y)
        return {"loss": Weighted(float(nn.functional.cross_entropy(logits, y.long(), reduction="sum")), n),
                "accuracy": Weighted(float((logits.argmax(1) == y).sum()), n)}


class MLP(Peer):  # fedpriv's "mlp": 784-256-128-10, ReLU
    def __init__(self, shape, c):
        super().__init__()
        d = int(np.prod(shape))
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(d, 256), nn.ReLU(), nn.Linear(256, 128), nn.ReLU(),
                                 nn.Linear(128, c))


class CNN(Peer):  # fedpriv's "cnn" at 28x28: two conv3x3 + GroupNorm(8) + tanh + maxpool 2 blocks, 128 hidden
    def __init__(self, shape, c):
        super().__init__()
        channels, side = shape[0], shape[1]
        self.net = nn.Sequential(
            nn.Conv2d(channels, 32, 3, padding=1), nn.GroupNorm(8, 32), nn.Tanh(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.GroupNorm(8, 64), nn.Tanh(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(64 * (side // 4) ** 2, 128), nn.Tanh(), nn.Linear(128, c))


def user_data(idx):
    return Dataset(raw_data=[np.asarray(x_all[idx]), y_all[idx]])


def train_fn(uid):
    u = int(uid)
    return user_data(train_idx[offsets[u]:offsets[u + 1]])


def val_fn(uid):
    u = int(uid)
    return user_data(val_idx[val_offsets[u]:val_offsets[u + 1]])


train_fed = FederatedDataset(train_fn, get_user_sampler("random", users))
val_fed = FederatedDataset(val_fn, get_user_sampler("random", users))
central = Dataset(raw_data=[np.load(cfg["x_test"]), data["y_test"]])
module = {"mlp": MLP, "cnn": CNN}[cfg["model"]](x_all.shape[1:], int(cfg["num_classes"]))
model = PyTorchModel(model=module,
                     local_optimizer_create=lambda params, lr: torch.optim.SGD(params, lr=lr, momentum=0.9),
                     central_optimizer=torch.optim.SGD(module.parameters(), lr=1.0))
postprocessors = []
if cfg["dp"]:
    from pfl.privacy import CentrallyAppliedPrivacyMechanism, GaussianMechanism
    postprocessors.append(CentrallyAppliedPrivacyMechanism(
        GaussianMechanism(clipping_bound=cfg["clip"], relative_noise_stddev=cfg["z"])))
backend = SimulatedBackend(training_data=train_fed, val_data=val_fed, postprocessors=postprocessors)


class Clock(TrainingProcessCallback):
    def on_train_begin(self, *, model):
        self.start = self.end = time.perf_counter()
        self.rounds = []
        return Metrics()

    def after_central_iteration(self, aggregate_metrics, model, *, central_iteration):
        now = time.perf_counter()
        self.rounds.append(now - self.end)
        self.end = now
        self.last = {str(k): float(v) for k, v in aggregate_metrics.to_simple_dict().items()}
        return False, Metrics()


clock = Clock()
started = time.perf_counter()
FederatedAveraging().run(
    algorithm_params=NNAlgorithmParams(central_num_iterations=cfg["rounds"], evaluation_frequency=1,
                                       train_cohort_size=cfg["cohort"], val_cohort_size=cfg["val_cohort"]),
    backend=backend, model=model,
    model_train_params=NNTrainHyperParams(local_learning_rate=cfg["lr"], local_num_epochs=1,
                                          local_batch_size=cfg["batch_size"]),
    model_eval_params=NNEvalHyperParams(local_batch_size=1024),
    callbacks=[CentralEvaluationCallback(central, model_eval_params=NNEvalHyperParams(local_batch_size=1024),
                                         frequency=1), clock])
accuracy = next((v for k, v in clock.last.items() if "Central val" in k and "accuracy" in k), float("nan"))
with open(cfg["result"], "w") as fh:
    later = sorted(clock.rounds[1:]) or clock.rounds
    json.dump({"round_seconds": (clock.end - clock.start) / cfg["rounds"],
               "steady_round_seconds": later[len(later) // 2],
               "run_seconds": time.perf_counter() - started, "accuracy": accuracy}, fh)
'''


def fedpriv_config(workload: str, out_dir: str) -> dict:
    from simulations.runconfig import resolve

    return resolve(None, {"dataset": "fashion-mnist", "out-dir": out_dir, **WORKLOADS[workload]})


def write_split(workload: str, folder: Path) -> dict[str, str]:
    """fedpriv's own split of the workload, as flat index arrays pfl's per-user datasets read from."""
    import numpy as np

    from common import load_dataset
    from common.partitions import holdout_split
    from common.task import _partitions
    from simulations.runconfig import validate

    rc = fedpriv_config(workload, str(folder / "unused"))
    cfg = validate(rc).data
    ds = load_dataset(cfg.dataset, cfg.data_dir or None)
    parts = _partitions(cfg.dataset, cfg.data_dir, cfg.partition, cfg.num_clients, cfg.seed)
    splits = [holdout_split(p, cfg.holdout_fraction, cfg.seed + i) for i, p in enumerate(parts)]
    lengths = [len(t) for t, _ in splits]
    val_lengths = [len(v) for _, v in splits]
    paths = {"split": str(folder / "split.npz"), "x_train": str(folder / "x_train.npy"),
             "x_test": str(folder / "x_test.npy")}
    np.save(paths["x_train"], ds.x_train)
    np.save(paths["x_test"], ds.x_test)
    np.savez(paths["split"], y_train=ds.y_train, y_test=ds.y_test,
             offsets=np.r_[0, np.cumsum(lengths)], train_idx=np.concatenate([t for t, _ in splits]),
             val_offsets=np.r_[0, np.cumsum(val_lengths)], val_idx=np.concatenate([v for _, v in splits]))
    return {**paths, "num_classes": ds.spec.num_classes}


def pfl_command(workload: str, split: dict, threads: int, result: Path) -> list[str]:
    w = WORKLOADS[workload]
    cohort = round(w["num-clients"] * w["fraction-train"])
    cfg = {**split, "result": str(result), "threads": threads, "seed": 42, "rounds": w["num-rounds"], "cohort": cohort,
           "model": w["model"],
           "val_cohort": round(w["num-clients"] * w["fraction-evaluate"]), "lr": 0.05, "batch_size": 64,
           "dp": w.get("dp") == "user", "z": w.get("user-noise-multiplier", 0.0),
           "clip": w.get("user-clipping-norm", 0.0)}
    script = HERE / ".pfl-venv" / "fedpriv_peer.py"
    script.write_text(PFL_SCRIPT)
    return [str(VENV / "bin" / "python"), str(script), json.dumps(cfg)]


def fedpriv_command(workload: str, engine: str, out_dir: str) -> list[str]:
    flags = []
    for key, value in WORKLOADS[workload].items():
        flags += ["--set", f"{key}={value}"]
    return [sys.executable, "-m", "simulations.cli", "simulate", "--dataset", "fashion-mnist", *flags,
            "--engine", engine, "--out", out_dir]


def fedpriv_result(out_dir: Path) -> dict:
    from server.records import read_rounds

    rounds = [r for r in read_rounds(out_dir) if r["round"] >= 1]
    later = sorted(r["seconds"] for r in rounds[1:]) or [rounds[0]["seconds"]]
    return {"round_seconds": sum(r["seconds"] for r in rounds) / len(rounds),
            # Round 1 also pays one-time costs (asking every node who it is; torch importing its compiler
            # stack at the first optimizer): the median of the later rounds is the engine's steady pace.
            "steady_round_seconds": later[len(later) // 2],
            "accuracy": rounds[-1]["server"]["accuracy"]}


def run_one(workload: str, engine: str, split: dict, threads: int) -> dict:
    from benchmarks.procmem import run_measured

    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), **MALLOC_ENV}
    with tempfile.TemporaryDirectory() as tmp:
        if engine == "pfl":
            out = Path(tmp) / "pfl.json"
            code, wall, peak = run_measured(pfl_command(workload, split, threads, out), env=env)
            result = json.loads(out.read_text()) if code == 0 else {}
        else:
            code, wall, peak = run_measured(fedpriv_command(workload, engine, tmp), env=env)
            result = fedpriv_result(Path(tmp)) if code == 0 else {}
    load = os.getloadavg()
    return {"workload": workload, "engine": engine, "exit": code, "process_seconds": round(wall, 2),
            "peak_rss_mb": round(peak / 2**20), "load_1m": round(load[0], 2),
            **{k: round(v, 4) for k, v in result.items()
               if k in ("round_seconds", "steady_round_seconds", "accuracy")}}


def summarize(rows: list[dict]) -> list[dict]:
    table = []
    for workload in dict.fromkeys(r["workload"] for r in rows):
        for engine in dict.fromkeys(r["engine"] for r in rows):
            ok = [r for r in rows if r["workload"] == workload and r["engine"] == engine and r["exit"] == 0]
            if not ok:
                continue
            table.append({"workload": workload, "engine": engine, "runs": len(ok),
                          "round_seconds": statistics.median(r["round_seconds"] for r in ok),
                          "steady_round_seconds": statistics.median(r["steady_round_seconds"] for r in ok),
                          "process_seconds": statistics.median(r["process_seconds"] for r in ok),
                          "peak_rss_mb": statistics.median(r["peak_rss_mb"] for r in ok),
                          "accuracy": statistics.median(r["accuracy"] for r in ok),
                          "load_1m": [r["load_1m"] for r in ok]})
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--install", action="store_true", help="make benchmarks/.pfl-venv and stop")
    parser.add_argument("--workloads", nargs="+", choices=sorted(WORKLOADS), default=["B", "C"])
    parser.add_argument("--engines", nargs="+", choices=ENGINES, default=["pfl", "inprocess"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, help="override every workload's rounds (a bounded run)")
    parser.add_argument("--out", default="benchmarks/results/peers.json")
    args = parser.parse_args()
    if args.install or ("pfl" in args.engines and not (VENV / "bin" / "python").exists()):
        install()
        if args.install:
            return
    if args.rounds:
        for w in args.workloads:
            WORKLOADS[w]["num-rounds"] = args.rounds
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        splits = {}
        if "pfl" in args.engines:
            for w in args.workloads:
                (Path(tmp) / w).mkdir()
                splits[w] = write_split(w, Path(tmp) / w)
        for repeat in range(args.repeats):
            for w in args.workloads:
                for engine in args.engines:
                    rows.append({"repeat": repeat, **run_one(w, engine, splits.get(w, {}), args.threads)})
                    print(json.dumps(rows[-1]), flush=True)
    result = {"threads": args.threads, "repeats": args.repeats, "rounds": args.rounds or "as defined",
              "rows": rows, "medians": summarize(rows)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    for row in result["medians"]:
        print(json.dumps(row))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
