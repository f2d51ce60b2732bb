"""A deployment round on loopback against the same round in the in-process engine.

    .venv/bin/python -m benchmarks.deploy_rounds --clients 2 5 --examples 2000 --rounds 3 \\
        --out benchmarks/results/deploy_rounds.json

The workload is the CNN on Fashion-MNIST, each client training on its own file of `--examples` examples
(written by client.split, the same files for every variant), one local epoch a round. With
`--dataset digits --model mlp` the work is next to nothing and a round's time is the transport's overhead.
Variants:

- inprocess: the in-process engine, clients one after another in this process, fed the same files.
- default: `fedpriv server` (a SuperLink with TLS and SuperNode authentication) and one plain `fedpriv client`
  per file (a SuperNode each): the trusted executor (each message in a child forked from a process that has
  imported torch, Flower and the installed ClientApp, and loaded the dataset, once) and 0.2 s polling.
- poll3: the default with Flower's own 3 s polling (`--poll-interval 3`).
- flower: `--allow-server-code --poll-interval 3`: Flower's own executor and polling, a fresh ClientApp
  process for every message (what a Flower SuperNode does out of the box).

`--set KEY=VALUE` (repeatable) adds run-config keys to every variant alike, e.g. `--set secagg=true
--set secagg-threshold=3` for the cost of a SecAgg+ round, in process and deployed.

The figure compared is the round loop's own `seconds` per round from metrics.json (sampling, messages,
client training and evaluation, aggregation, the server's test-set evaluation, records), the same clock for
every variant. Round 1 also carries each client's first message (the query that tells the server who it
is) and one-time start-up; rounds 2.. are the steady state.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ("inprocess", "default", "poll3", "flower")
# fedpriv client flags per deployed variant
CLIENT_FLAGS = {"default": [], "poll3": ["--poll-interval", "3"],
                "flower": ["--allow-server-code", "--poll-interval", "3"]}


def run_config(rounds: int, clients: int, out_dir: Path, dataset: str = "fashion-mnist",
               model: str = "cnn", extra: dict[str, str] | None = None) -> dict:
    from simulations.runconfig import resolve

    # One local epoch at batch 64 (the settings of the earlier figures), not the dataset's recommendation.
    return resolve(None, {"dataset": dataset, "model": model, "num-rounds": rounds, "num-clients": clients,
                          "min-clients": clients, "out-dir": str(out_dir), "local-epochs": 1, "batch-size": 64,
                          "learning-rate": 0.05, **(extra or {})})


def run_inprocess(files: list[Path], rounds: int, out_dir: Path, dataset: str, model: str,
                  extra: dict[str, str]) -> None:
    """The in-process engine over the same client files (node config `data-path`, as a SuperNode gets)."""
    import client.app
    import server.app
    from simulations.inprocess import run_inprocess as engine

    nodes = [{"data-path": str(f), "client-id": f.stem} for f in files]
    engine(server.app.app, client.app.app, nodes, run_config(rounds, len(files), out_dir, dataset, model, extra))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _fedpriv(args: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen:
    with open(log, "ab") as out:
        return subprocess.Popen([sys.executable, "-m", "simulations.cli", *args], cwd=ROOT, env=env,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def _stop(proc: subprocess.Popen) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=15)


def run_deployed(files: list[Path], certs: Path, rounds: int, out_dir: Path, executor: str, work: Path,
                 dataset: str, model: str, extra: dict[str, str]) -> None:
    # The checkout first, then whatever the caller already had on the path (e.g. packages installed with --target).
    path = os.pathsep.join(filter(None, (str(ROOT), os.environ.get("PYTHONPATH"))))
    env = dict(os.environ, PYTHONPATH=path, PYTHONUNBUFFERED="1")
    address = f"127.0.0.1:{_free_port()}"
    threads = max(1, (os.cpu_count() or 1) // len(files))
    procs = []
    try:
        server = _fedpriv(["server", "--certs", str(certs), "--address", address,
                           "--dataset", dataset, "--model", model, "--rounds", str(rounds),
                           "--num-clients", str(len(files)), "--local-epochs", "1", "--batch-size", "64",
                           "--lr", "0.05",
                           "--min-clients", str(len(files)), "--round-timeout", "900", "--out", str(out_dir),
                           *[a for k, v in extra.items() for a in ("--set", f"{k}={v}")]],
                          work / f"server-{executor}.out", env)
        procs.append(server)
        deadline, server_out = time.monotonic() + 300, work / f"server-{executor}.out"
        while "admitted clients" not in server_out.read_text():
            if server.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"fedpriv server did not start: {server_out.read_text()}")
            time.sleep(0.5)
        for f in files:
            procs.append(_fedpriv(["client", "--superlink", address, "--certs", str(certs), "--data", str(f),
                                   "--state-dir", str(work / f"state-{executor}-{f.stem}"), "--threads",
                                   str(threads), "--dataset", dataset, *CLIENT_FLAGS[executor]],
                                  work / f"{f.stem}-{executor}.out", env))
        if server.wait(timeout=3600) != 0:
            raise SystemExit(f"fedpriv server failed: {server_out.read_text()[-2000:]}")
    finally:
        for proc in procs:
            _stop(proc)


def measure(variant: str, files: list[Path], certs: Path, rounds: int, work: Path, dataset: str,
            model: str, extra: dict[str, str]) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    out_dir = work / f"run-{variant}"
    started = time.perf_counter()
    if variant == "inprocess":
        # A fresh interpreter, as the deployment's processes are: nothing cached from an earlier variant.
        code = subprocess.call([sys.executable, "-m", "benchmarks.deploy_rounds", "--one", str(out_dir),
                                "--rounds", str(rounds), "--dataset", dataset, "--model", model,
                                "--files", *map(str, files),
                                *[a for k, v in extra.items() for a in ("--set", f"{k}={v}")]], cwd=ROOT)
        if code != 0:
            raise SystemExit(f"in-process run failed (exit {code})")
    else:
        run_deployed(files, certs, rounds, out_dir, variant, work, dataset, model, extra)
    wall = time.perf_counter() - started
    records = json.loads((out_dir / "metrics.json").read_text())["rounds"]
    tasks = task_times(work, variant)
    seconds = [r["seconds"] for r in records if r["round"] >= 1]
    steady = [r.get("phase_seconds", {}) for r in records if r["round"] >= 2]
    phases = {k: round(statistics.median(p[k] for p in steady), 3) for k in (steady[0] if steady else {})}
    return {"clients": len(files), "variant": variant, "round_seconds": [round(s, 2) for s in seconds],
            "round1_seconds": round(seconds[0], 2),
            "steady_round_seconds": round(statistics.median(seconds[1:]), 2) if len(seconds) > 1 else None,
            "wall_seconds": round(wall, 1), "accuracy": round(records[-1]["server"]["accuracy"], 4),
            "steady_phase_seconds": phases,
            "trained": [len(r["train"]) for r in records if r["round"] >= 1], **tasks}


def task_times(work: Path, variant: str) -> dict:
    """Medians over every message the trusted executor ran (its TIMING lines): the forked task from start
    to exit, pulling its inputs (message, context, bundle), checking the bundle, the ClientApp itself, and
    pushing the reply and the final status."""
    parts: dict[str, list[float]] = {}
    for log in work.glob(f"state-{variant}-*/executor.log"):
        for m in re.finditer(r"TIMING task ([\d.]+) s: pull ([\d.]+), check ([\d.]+), app ([\d.]+), "
                             r"reply ([\d.]+)", log.read_text(errors="replace")):
            for name, value in zip(("task", "pull", "check", "app", "reply"), m.groups(), strict=True):
                parts.setdefault(name, []).append(float(value))
    if not parts:
        return {}
    out = {f"median_{k}_seconds": round(statistics.median(v), 3) for k, v in parts.items()}
    out["tasks"] = len(parts["task"])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, nargs="+", default=[2, 5])
    parser.add_argument("--examples", type=int, default=2000, help="examples per client")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dataset", default="fashion-mnist")
    parser.add_argument("--model", default="cnn")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--repeat", type=int, default=1, help="run the variants this many times, interleaved")
    parser.add_argument("--out", default="benchmarks/results/deploy_rounds.json")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a run-config key for every variant, e.g. secagg=true")
    parser.add_argument("--keep", help="keep the work folder (logs, records) here instead of a temporary one")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--files", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if any("=" not in item for item in args.set):
        parser.error("--set takes KEY=VALUE, e.g. --set secagg=true")
    extra = dict(item.split("=", 1) for item in args.set)
    if args.one:
        import logging

        logging.getLogger("flwr").setLevel(logging.WARNING)
        run_inprocess([Path(f) for f in args.files], args.rounds, Path(args.one), args.dataset, args.model,
                      extra)
        return

    from client.split import split_dataset
    from server.certs import create_certs

    rows = []
    with (contextlib.nullcontext(args.keep) if args.keep
          else tempfile.TemporaryDirectory(prefix="fedpriv-deploy-bench-")) as tmp:
        work = Path(tmp)
        for n in args.clients:
            data = split_dataset(args.dataset, n, "iid", work / f"data-{n}", seed=42,
                                 max_examples=args.examples)
            certs = create_certs(work / f"certs-{n}", ["localhost", "127.0.0.1"], clients=n)
            for rep in range(args.repeat):
                for variant in args.variants:
                    row = measure(variant, [f.path for f in data], certs.root, args.rounds,
                                  work / f"n{n}-{rep}", args.dataset, args.model, extra)
                    row["repeat"] = rep
                    row["load_average"] = round(os.getloadavg()[0], 2)
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    for row in rows:
        base = next((r for r in rows if r["clients"] == row["clients"] and r["variant"] == "inprocess"
                     and r["repeat"] == row["repeat"]), None)
        if base and row["steady_round_seconds"] and base["steady_round_seconds"]:
            row["steady_vs_inprocess"] = round(row["steady_round_seconds"] / base["steady_round_seconds"], 2)
            row["round1_vs_inprocess"] = round(row["round1_seconds"] / base["round1_seconds"], 2)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"dataset": args.dataset, "model": args.model, "set": extra,
                                          "examples_per_client": args.examples, "rounds": args.rounds,
                                          "cpus": os.cpu_count(), "rows": rows}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
