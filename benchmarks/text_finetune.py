"""Issue 15, item 1: VADER sentiment over 4 natural clients (one per domain), pretrained MiniLM fine-tuned
with and without sample-level DP, against the from-scratch Transformer and centralized fine-tuning.

    python -m benchmarks.text_finetune [--cells minilm,minilm-dp8] [--rounds 3] [--max-examples-per-client 400]
        [--max-length 48] [--device cuda] [--data-dir DIR] [--model-dir DIR] [--out FILE.json]

Every cell is a real `fedpriv simulate` run (the same ServerApp and ClientApp, in process), written under
--work-dir; the script then loads each run's model.pt and scores it on the server's test set, overall and per
domain (accuracy and macro F1), and writes one JSON (rewritten after every cell, so a stopped grid keeps what
finished). --max-examples-per-client M keeps a seeded sample of about M / 0.8 scored texts per domain (written
as a smaller corpus folder), so each client trains on about M texts and the test set holds about M / 4 per domain.

Offline, elsewhere: --data-dir names a folder with vaderSentiment-3.3.2.tar.gz (or the four *_GroundTruth.txt
files); --model-dir (or $FEDPRIV_MINILM_DIR) a folder with the MiniLM files listed in models.minilm.MODEL_FILES.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
import tomllib
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "benchmarks" / "configs" / "text_finetune.toml"
OUT = ROOT / "benchmarks" / "results" / "text_finetune.json"
SUBSET_SEED = 0


def subset_corpus(source: Path, per_client: int, root: Path) -> Path:
    """A folder with the four gold-standard files, each a seeded sample of ceil(per_client / 0.8) scored texts
    (score 0 is left out here, as the loader would): the loader's 80/20 split leaves about per_client to train."""
    from common import vader

    folder = root / f"vader-{per_client}-per-domain-seed{SUBSET_SEED}"
    if all((folder / name).is_file() for name in vader.DOMAINS.values()):
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    keep = math.ceil(per_client / (1.0 - vader.TEST_FRACTION))
    rng = np.random.default_rng(SUBSET_SEED)
    for domain, raw in vader.read_files(source).items():
        lines = [line for line in raw.decode("utf-8", errors="replace").splitlines()
                 if len(parts := line.split("\t")) >= 3 and _nonzero(parts[1])]
        chosen = sorted(rng.permutation(len(lines))[:keep])
        (folder / vader.DOMAINS[domain]).write_text("\n".join(lines[i] for i in chosen) + "\n", encoding="utf-8")
    return folder


def _nonzero(score: str) -> bool:
    try:
        return float(score) != 0
    except ValueError:
        return False


def cell_configs(config: dict[str, Any], names: list[str], args: argparse.Namespace,
                 data_dir: str, work: Path) -> list[tuple[str, dict[str, Any], bool]]:
    """(name, run-config overrides, centralized?) per chosen cell, with the command line's shrinking applied."""
    common = dict(config["common"])
    if args.rounds:
        common["num-rounds"] = args.rounds
    if args.max_length:
        common["text-max-length"] = args.max_length
    common["device"] = args.device
    common["data-dir"] = data_dir
    cells = []
    for name in names:
        if name not in config["cells"]:
            raise SystemExit(f"unknown cell {name!r}; the config has: {', '.join(config['cells'])}")
        own = dict(config["cells"][name])
        central = bool(own.pop("central", False))
        cells.append((name, {**common, **own, "out-dir": str(work / "runs" / name)}, central))
    return cells


def run_one(name: str, overrides: dict[str, Any], central: bool, work: Path) -> float:
    """Run the cell's simulation; returns its wall time in seconds."""
    from simulations.cells import Cell, run_cell
    from simulations.centralized import centralized_run
    from simulations.runconfig import resolve

    run_config = resolve(None, overrides)
    nodes = None
    if central:
        tag = f"{Path(str(run_config['data-dir'])).name}-len{run_config['text-max-length']}"
        run_config, nodes = centralized_run(run_config, work / "central" / tag)
    start = time.perf_counter()
    run_cell(Cell(name, {}, run_config, nodes))
    return time.perf_counter() - start


def score(name: str, run_dir: Path, device: str) -> dict[str, Any]:
    """Accuracy and macro F1 of the run's final model on the server's test set, overall and per domain."""
    import torch

    from common import load_dataset
    from common.config import DataConfig, TrainConfig
    from common.devices import resolve_device
    from common.training import classification_metrics, predict
    from models import build_model, split_stages

    run_config = tomllib.loads((run_dir / "config.toml").read_text())
    data, train = DataConfig.from_run_config(run_config), TrainConfig.from_run_config(run_config)
    ds = load_dataset(data.dataset, data.data_dir or None, data.text_max_length)
    model = build_model(train.model, ds.spec)
    # A staged model (minilm-head) saves its head's weights: what the federation averaged.
    split_stages(model)[1].load_state_dict(torch.load(run_dir / "model.pt", weights_only=True))
    model.to(resolve_device(device))
    logits = predict(model, ds.x_test)
    keep = ("accuracy", "f1_macro")
    out: dict[str, Any] = {"test_examples": len(ds.y_test),
                           "overall": {k: v for k, v in classification_metrics(ds.y_test, logits).items() if k in keep},
                           "per_domain": {}}
    for domain in sorted(set(ds.test_groups.tolist())):
        rows = ds.test_groups == domain
        metrics = classification_metrics(ds.y_test[rows], logits[torch.from_numpy(rows)])
        out["per_domain"][domain] = {"n": int(rows.sum()), **{k: metrics[k] for k in keep}}
    rounds = json.loads((run_dir / "metrics.json").read_text())["rounds"]
    out["server_accuracy_per_round"] = [r["server"].get("accuracy") for r in rounds if r["round"] > 0]
    out["upload_bytes_per_round"] = next((r.get("upload_bytes") for r in reversed(rounds) if r["round"] > 0), None)
    out["train_examples_per_client"] = [t["metrics"]["num-examples"] for t in rounds[-1].get("train", [])]
    privacy = run_dir / "privacy.json"
    if privacy.exists():
        clients = json.loads(privacy.read_text())["sample_level"]["clients"]
        out["epsilon_max"] = max(c["epsilon"] for c in clients)
        out["noise_multiplier"] = [c["noise_multiplier"] for c in clients]
        out["grad_sample_mode"] = sorted({str(c.get("grad_sample_mode")) for c in clients})
    return out


def wire_bytes(spec: Any) -> dict[str, Any]:
    """Bytes of one model message: what travels (trainable float32 weights) against the whole model."""
    from models import build_model

    out = {}
    for name in ("minilm", "minilm-head", "transformer"):
        model = build_model(name, spec, seed=0)
        # A staged model's fixed stage holds the encoder outside its module tree (models/minilm.py): count it.
        encoder = getattr(getattr(model, "features", None), "_encoder", [])
        whole = 4 * sum(p.numel() for m in (model, *encoder) for p in m.parameters())
        sent = 4 * sum(v.numel() for v in model.state_dict().values())
        # a round: the global model to each of the 4 clients and each client's update back
        out[name] = {"sent_bytes": sent, "whole_model_bytes": whole,
                     "saved_per_round_4_clients": 8 * (whole - sent)}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=CONFIG)
    parser.add_argument("--cells", default="", help="comma-separated cell names (default: every cell)")
    parser.add_argument("--rounds", type=int, default=0, help="override num-rounds")
    parser.add_argument("--max-examples-per-client", type=int, default=0, help="0: the whole corpus")
    parser.add_argument("--max-length", type=int, default=0, help="override text-max-length (tokens)")
    parser.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N | auto")
    parser.add_argument("--data-dir", type=Path, default=None, help="folder with the VADER sdist")
    parser.add_argument("--model-dir", type=Path, default=None, help="folder with the MiniLM files")
    parser.add_argument("--work-dir", type=Path, default=ROOT / "runs" / "text_finetune")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args(argv)
    if args.model_dir:
        os.environ["FEDPRIV_MINILM_DIR"] = str(args.model_dir.resolve())
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from common import vader
    from common.datasets import load_dataset

    config = tomllib.loads(args.config.read_text())
    names = [n for n in args.cells.split(",") if n] or list(config["cells"])
    source = (args.data_dir or vader.DEFAULT_DIR).resolve()
    data_dir = source
    if args.max_examples_per_client:
        data_dir = subset_corpus(source, args.max_examples_per_client, args.work_dir / "data")
    cells = cell_configs(config, names, args, str(data_dir), args.work_dir)
    max_length = int(cells[0][1]["text-max-length"])
    spec = load_dataset("vader-sentiment", str(data_dir), max_length).spec
    import transformers

    result: dict[str, Any] = {
        "settings": {"config": str(args.config.relative_to(ROOT) if args.config.is_relative_to(ROOT) else args.config),
                     "rounds": int(cells[0][1]["num-rounds"]), "max_examples_per_client": args.max_examples_per_client,
                     "text_max_length": max_length, "device": args.device, "threads": torch.get_num_threads(),
                     "python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__, "machine": platform.machine(),
                     "cpu_count": os.cpu_count(),
                     "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None},
        "bytes": wire_bytes(spec),
        "cells": {},
    }
    if args.out.exists():  # keep the cells of an earlier invocation with the same settings
        earlier = json.loads(args.out.read_text())
        if earlier.get("settings") == result["settings"]:
            result["cells"] = earlier.get("cells", {})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for name, overrides, central in cells:
        print(f"[{time.strftime('%H:%M:%S')}] {name} ...", flush=True)
        seconds = run_one(name, overrides, central, args.work_dir)
        scored = score(name, Path(overrides["out-dir"]), args.device)
        result["cells"][name] = {"model": overrides["model"], "dp": overrides.get("dp", "none"),
                                 "target_epsilon": overrides.get("target-epsilon"), "centralized": central,
                                 "seconds": round(seconds, 1), **scored,
                                 "run_config": {k: v for k, v in overrides.items() if k != "data-dir"}}
        overall = scored["overall"]
        print(f"  {name}: accuracy {overall['accuracy']:.4f}, macro F1 {overall['f1_macro']:.4f}, "
              f"{seconds:.0f} s" + (f", epsilon {scored['epsilon_max']:.2f}" if "epsilon_max" in scored else ""),
              flush=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"results: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
