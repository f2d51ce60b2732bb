"""`fedpriv server`, the command: reads the flags and the run config, then runs server.deploy's deployment.

The command sits here, above the apps, because it resolves and validates the run config as `fedpriv simulate`
does (simulations.runconfig); server/ itself, which a real server runs, never imports simulations/.
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path
from typing import Any

from common.paths import input_dir
from server.deploy import (
    CHECKPOINT,
    DEFAULT_ADDRESS,
    ServerDeployError,
    ServerSettings,
    check_port_free,
    loud_insecure_warning,
    parse_address,
    run_failure,
    security_from,
    serve,
)
from simulations.runconfig import resolve, validate
from simulations.simulate import RUN_FLAGS, add_run_flags, overrides_from


def run_config_from(args: argparse.Namespace) -> dict[str, Any]:
    """defaults < --config (or, resuming, the run's own config.toml) < flags; out-dir absolute."""
    overrides = overrides_from(args, RUN_FLAGS)
    for key in ("min-clients", "round-timeout"):
        value = getattr(args, key.replace("-", "_"))
        if value is not None:
            overrides[key] = value
    config_file = args.config
    if args.resume:
        run_dir = input_dir(args.resume, "--resume", "folder of the run to continue")
        if not (run_dir / CHECKPOINT).is_file():
            raise ServerDeployError(f"--resume {run_dir}: no {CHECKPOINT} there; resume needs the folder of "
                                    "a run that finished at least one round")
        config_file = config_file or run_dir / "config.toml"
        overrides["resume-from"] = str(run_dir)
        overrides.setdefault("out-dir", str(run_dir))
    elif args.out is None:
        raise ServerDeployError("--out is required: the run folder for the records (or --resume RUN_DIR)")
    run_config = resolve(config_file, overrides)
    if not args.resume:
        out = Path(run_config["out-dir"])
        if (out / "metrics.json").exists():
            raise ServerDeployError(f"{out} already holds a run's records; continue it with --resume {out}, "
                                    "or choose another --out")
        run_config["resume-from"] = ""
    return run_config



def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("server",
                              help="run a deployment's server: a Flower SuperLink and the fedpriv run",
                              description="Start a Flower SuperLink (TLS and client authentication by "
                                          "default), wait for clients, run fedpriv on them and write the "
                                          "records into --out.")
    add_run_flags(p)
    d = p.add_argument_group("deployment")
    d.add_argument("--address", default=DEFAULT_ADDRESS, metavar="HOST:PORT",
                   help=f"where the SuperLink listens (default {DEFAULT_ADDRESS}; "
                        "0.0.0.0:PORT serves other machines)")
    d.add_argument("--certs",
                   help="a `fedpriv certs` folder: ca.crt, server.crt, server.key, client-keys/*.pub")
    d.add_argument("--insecure", action="store_true",
                   help="no TLS, no authentication: loopback experiments only")
    d.add_argument("--min-clients", type=int,
                   help="replies a round needs to count (the run config's min-clients)")
    d.add_argument("--round-timeout", type=float, help="seconds a round waits for its clients' replies")
    d.add_argument("--start-clients", type=int, metavar="N",
                   help="clients that must be connected before the run starts (default: --min-clients)")
    d.add_argument("--start-timeout", type=float, default=600.0, metavar="SECONDS",
                   help="how long to wait for them (default 600)")
    d.add_argument("--resume", metavar="RUN_DIR", help="continue that run from its last finished round")
    p.set_defaults(func=run_server)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def run_server(args: argparse.Namespace) -> int:
    host, port = parse_address(args.address)
    certs, keys = security_from(args, host)
    run_config = run_config_from(args)
    validate(run_config)
    if certs is None:
        loud_insecure_warning()
    check_port_free(host, port)
    start_clients = args.start_clients or int(run_config["min-clients"])
    if start_clients < int(run_config["min-clients"]):
        raise ServerDeployError(f"--start-clients {start_clients} is below min-clients "
                                f"{run_config['min-clients']}; the first round could not count; start with "
                                "at least --min-clients clients")
    settings = ServerSettings(host, port, certs, keys, Path(run_config["out-dir"]), start_clients,
                              args.start_timeout)
    settings.run_dir.mkdir(parents=True, exist_ok=True)
    signal.signal(signal.SIGTERM, _interrupt)  # a stop request ends like Ctrl-C: the SuperLink is stopped too
    try:
        status = serve(run_config, settings)
    except KeyboardInterrupt:
        print("server stopped; every finished round is kept. Continue with: fedpriv server --resume "
              f"{settings.run_dir} {'--certs ' + str(certs.root) if certs else '--insecure'} --address "
              f"{args.address}",
              file=sys.stderr)
        return 130
    if status != "finished:completed":
        raise ServerDeployError(run_failure(status, settings.deploy_dir / "serverapp.log"))
    reports = ", privacy.json, report.md, report.html" if (settings.run_dir / "privacy.json").exists() else ""
    print(f"run finished; records in {settings.run_dir} (config.toml, metrics.json, metrics.csv, model.pt"
          f"{reports})")
    return 0

