"""`fedpriv simulate`: one federated run on one machine, in-process (default) or on Flower's Ray runtime."""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from simulations.runconfig import Configs, resolve, validate

ENGINES = ("inprocess", "ray")

# flag -> run-config key, for the flags whose name is not the key itself.
FLAG_KEYS = {"rounds": "num-rounds", "out": "out-dir", "lr": "learning-rate"}


def add_run_flags(parser: argparse.ArgumentParser) -> None:
    """The run-config flags shared by every command that starts runs (simulate, server)."""
    g = parser.add_argument_group("run config (flags override --config, which overrides the defaults)")
    g.add_argument("--config", metavar="FILE.toml", help="run-config keys, flat or under [tool.flwr.app.config]")
    g.add_argument("--dataset", help="digits | breast-cancer | fashion-mnist | shakespeare | vader-sentiment")
    g.add_argument("--data-dir", help="folder holding the dataset files (Fashion-MNIST IDX files; the VADER sdist)")
    g.add_argument("--model", help="a registered model: logreg, mlp, cnn, resnet, scatter-linear, scatter-cnn, "
                   "lstm, ngram, gpt, transformer, minilm, minilm-head")
    g.add_argument("--num-clients", type=int)
    g.add_argument("--rounds", type=int)
    g.add_argument("--fraction-train", type=float, help="share of clients sampled per round, in (0, 1]")
    g.add_argument("--fraction-evaluate", type=float,
                   help="share of clients evaluated per round, in [0, 1]; 0: the server's test set only")
    g.add_argument("--max-evaluate-clients", type=int, help="at most this many clients evaluated a round (0: no cap)")
    g.add_argument("--local-epochs", type=int)
    g.add_argument("--batch-size", type=int)
    g.add_argument("--optimizer", help="sgd | adam | adamw | rmsprop")
    g.add_argument("--lr", type=float, help="client learning rate")
    g.add_argument("--momentum", type=float)
    g.add_argument("--weight-decay", type=float)
    g.add_argument("--partition", help="iid | dirichlet:ALPHA | pathological:K | natural")
    g.add_argument("--strategy",
                   help="fedavg, fedavgm, fedprox, fedadam, fedyogi, fedadagrad, krum, trimmed-mean, median")
    g.add_argument("--proximal-mu", type=float, help="FedProx proximal term")
    g.add_argument("--seed", type=int)
    g.add_argument("--device", help="auto | cpu | cuda | cuda:N: clients' training and the server's evaluation")
    g.add_argument("--compress", help="client updates as sent: none | int8 | topk:FRACTION (e.g. topk:0.01)")
    g.add_argument("--out", help="folder for the run's records")
    d = parser.add_argument_group("differential privacy")
    d.add_argument("--dp", help="none | sample | user | local | sample,user")
    d.add_argument("--max-grad-norm", type=float, help="DP-SGD per-example clipping norm")
    d.add_argument("--noise-multiplier", type=float, help="DP-SGD noise multiplier (or --target-epsilon)")
    d.add_argument("--target-epsilon", type=float, help="calibrate the noise so the whole run meets this epsilon")
    d.add_argument("--delta", type=float)
    d.add_argument("--accountant", help="rdp (default) | prv | pld")
    d.add_argument("--budget-epsilon", type=float, help="each client's own budget: rounds beyond it are refused")
    d.add_argument("--budget-delta", type=float)
    d.add_argument("--user-noise-multiplier", type=float, help="user-level DP-FedAvg noise multiplier")
    d.add_argument("--user-clipping-norm", type=float, help="user-level DP-FedAvg update clipping norm")
    d.add_argument("--client-sampling", help="poisson | fixed (user-level DP)")
    d.add_argument("--secagg", action="store_const", const=True, default=None,
                   help="secure aggregation (SecAgg+): the server sees only the sum; with --dp user: distributed DP")
    d.add_argument("--secagg-shares", type=int, help="share holders per client, itself included (0 = all sampled)")
    d.add_argument("--secagg-threshold", type=int, help="survivors needed to release a round (0 = a majority)")
    d.add_argument("--secagg-bits", type=int, help="masked vectors live in Z_2^bits (8..62)")
    d.add_argument("--secagg-noise", help="distributed DP's integer noise: skellam (default) | discrete-gaussian")
    g.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any other run-config key, e.g. --set server-learning-rate=0.01 (repeatable)")


def overrides_from(args: argparse.Namespace, flags: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for flag in flags:
        value = getattr(args, flag.replace("-", "_"), None)
        if value is not None:
            out[FLAG_KEYS.get(flag, flag)] = value
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            from common import ConfigError

            raise ConfigError(f"--set {item!r} is not KEY=VALUE; write e.g. --set trim-beta=0.1")
        out[key.strip()] = value.strip()
    return out


RUN_FLAGS = ["dataset", "data-dir", "model", "num-clients", "rounds", "fraction-train", "fraction-evaluate",
             "max-evaluate-clients",
             "local-epochs", "batch-size", "optimizer", "lr", "momentum", "weight-decay", "partition", "strategy",
             "proximal-mu", "seed", "out", "dp", "max-grad-norm", "noise-multiplier", "target-epsilon", "delta",
             "accountant", "budget-epsilon", "budget-delta", "user-noise-multiplier", "user-clipping-norm",
             "client-sampling", "secagg", "secagg-shares", "secagg-threshold", "secagg-bits", "secagg-noise", "device",
             "compress"]


def node_configs(configs: Configs) -> list[dict[str, Any]]:
    n = configs.data.num_clients
    return [{"partition-id": i, "num-partitions": n} for i in range(n)]


def simulate(run_config: Mapping[str, Any], engine: str = "inprocess", ray_options: Any = None) -> Path:
    """Validate, then run; returns the run's folder. ray_options: simulations.ray_engine.RayOptions."""
    if ray_options is not None and engine == "ray":
        from simulations.ray_engine import check_ray_address

        if ray_options.address:
            check_ray_address(ray_options.address)  # before the data is loaded and partitioned
        if ray_options.gpus_per_client > 0 and str(run_config.get("device", "cpu")) == "cpu":
            from common import ConfigError

            raise ConfigError("--gpus-per-client gives each client a GPU share but device is cpu; add "
                              "--device cuda (or auto)")
    configs = validate(run_config)
    from client.app import app as client_app
    from server.app import app as server_app

    # Flower sets its logger to INFO when first imported, which is now (not when the parser is built):
    # every sampling and aggregation step would be logged; the progress bar says what a user needs.
    logging.getLogger("flwr").setLevel(logging.WARNING)
    if engine == "ray":
        from simulations.ray_engine import run_ray

        run_ray(server_app, client_app, configs.data.num_clients, run_config, ray_options)
    else:
        from simulations.inprocess import run_inprocess

        run_inprocess(server_app, client_app, node_configs(configs), run_config)
    return Path(configs.server.out_dir)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("simulate", help="run a federated simulation on this machine",
                              description="Run the fedpriv ServerApp and ClientApp over simulated clients.")
    add_run_flags(p)
    p.add_argument("--engine", choices=ENGINES, default="inprocess",
                   help="inprocess: messages handed straight to the ClientApp (fast); ray: Flower's runtime")
    a = p.add_argument_group("empirical audit (after the run: what `fedpriv audit OUT` does)")
    a.add_argument("--audit", action="store_true", help="audit the run with canaries right after it")
    a.add_argument("--canaries", type=int, default=None, metavar="M", help="canaries of the audit (default 1000)")
    a.add_argument("--confidence", type=float, default=0.95, help="confidence of the audit's lower bound")
    r = p.add_argument_group("Ray engine")
    r.add_argument("--ray-address", default="", metavar="auto|HOST:PORT",
                   help="join a running Ray cluster (its head's address, or auto for one started on this "
                        "machine) instead of starting a private one: client actors run on every node")
    r.add_argument("--gpus-per-client", type=float, default=0.0, metavar="G",
                   help="share of a GPU each client actor reserves (with --device cuda or auto), e.g. 0.5")
    r.add_argument("--cpus-per-client", type=float, default=2.0, metavar="C",
                   help="cores each client actor reserves (default 2)")
    p.set_defaults(func=run_simulate)


def run_simulate(args: argparse.Namespace) -> int:
    run_config = resolve(args.config, overrides_from(args, RUN_FLAGS))
    if args.audit:
        from simulations.audit import DEFAULT_CANARIES, check_audit_dp

        # Bad audit input fails now, before the run, not after it.
        check_audit_dp(run_config, args.canaries or DEFAULT_CANARIES, args.confidence)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray_options = None
    if args.engine == "ray":
        from simulations.ray_engine import RayOptions

        ray_options = RayOptions(args.ray_address, args.gpus_per_client, args.cpus_per_client)
    elif args.ray_address or args.gpus_per_client:
        from common import ConfigError

        raise ConfigError("--ray-address and --gpus-per-client are for --engine ray; add --engine ray")
    out = simulate(run_config, args.engine, ray_options)
    print(f"records written to {out}  (config.toml, metrics.json, metrics.csv, model.pt)")
    if (out / "privacy.json").exists():
        print(f"privacy report: {out / 'report.html'}  (and report.md, privacy.json)")
    if args.audit:
        from simulations.audit import DEFAULT_CANARIES, run_audit, summary_line

        record = run_audit(out, canaries=args.canaries or DEFAULT_CANARIES, confidence=args.confidence,
                           engine=args.engine)
        print(summary_line(record))
        return 0 if record["verdict"] == "consistent" else 1
    return 0
