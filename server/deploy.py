"""`fedpriv server`: a real deployment's coordinator, in one command.

It starts a Flower SuperLink (TLS and SuperNode authentication by default), admits the client public keys
it was given, waits for `--start-clients` SuperNodes, submits the fedpriv app as a run with the resolved run
config, prints one line per finished round, and stops the SuperLink when the run ends. The ServerApp is the
one `fedpriv simulate` runs, so the run folder gets the same records (config.toml, metrics.json/csv,
model.pt, checkpoint.pt, privacy.json and the reports with DP).

Everything Flower needs lives in the run folder: `deploy/flwr-home` (FLWR_HOME: the connection to this
SuperLink, installed app bundles), `deploy/app` (the app bundle's source), `deploy/superlink.log` and
`deploy/serverapp.log` (the ServerApp's own output).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import importlib.util
import json
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomli_w

from common import ConfigError
from common.processes import flower_bin, flower_env, start_group, stop_group
from server.certs import CertFiles, check_public_key, check_server_certs

CONNECTION = "fedpriv"
# What the ServerApp and the ClientApp import; the commands (simulations/) stay home.
APP_PACKAGES = ("models", "privacy", "common", "client", "server")
CHECKPOINT = "checkpoint.pt"
DEFAULT_ADDRESS = "127.0.0.1:9092"
WILDCARD_HOSTS = ("0.0.0.0", "::", "")


class ServerDeployError(ConfigError):
    """A server that cannot start or run as asked; the message names the value and the fix."""


def _tail(path: Path, lines: int = 200) -> list[str]:
    try:
        return path.read_text(errors="replace").splitlines()[-lines:]
    except FileNotFoundError:
        return []


# Flower's notices that it is retrying a connection: they say "failed" but are not why anything ended.
_RETRY_NOTICE = "Connection attempt failed, retrying"


def last_error(path: Path) -> str:
    """The most telling line of a Flower log: the last error or exception, else the last line."""
    tail = [line.strip() for line in _tail(path) if line.strip() and _RETRY_NOTICE not in line]
    for line in reversed(tail):
        if any(w in line for w in ("Error", "ERROR", "Exception", "refused", "failed")):
            return line[-300:]
    return tail[-1][-300:] if tail else "(empty log)"


# ---- the Flower CLI, pointed at this run's SuperLink -------------------------------------------------------

@dataclass(frozen=True)
class FlowerCli:
    """`flwr` with this run's FLWR_HOME, whose config.toml holds one connection: this SuperLink."""

    env: Mapping[str, str]

    def call(self, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess:
        return subprocess.run([flower_bin("flwr"), *args], env=dict(self.env), capture_output=True, text=True,
                              timeout=timeout, check=False)

    def json(self, *args: str, timeout: float = 120.0) -> dict[str, Any]:
        done = self.call(*args, "--format", "json", timeout=timeout)
        start = done.stdout.find("{")
        try:
            result = json.loads(done.stdout[start:]) if start >= 0 else {}
        except json.JSONDecodeError:
            result = {}
        if done.returncode != 0 or not result.get("success", False):
            said = (done.stderr or done.stdout).strip().splitlines()
            reason = result.get("error-message") or (said[-1] if said else "no output")
            raise ServerDeployError(f"`flwr {' '.join(args)}` failed: {str(reason).strip()[:300]}")
        return result


def write_connection(flwr_home: Path, address: str, root_cert: Path | None) -> Path:
    flwr_home.mkdir(parents=True, exist_ok=True)
    conn: dict[str, Any] = {"address": address}
    if root_cert is None:
        conn["insecure"] = True
    else:
        conn["root-certificates"] = str(root_cert)
    path = flwr_home / "config.toml"
    path.write_text(tomli_w.dumps({"superlink": {"default": CONNECTION, CONNECTION: conn}}))
    return path


# ---- the app bundle ----------------------------------------------------------------------------------------

def stage_app(run_config: Mapping[str, Any], where: Path) -> Path:
    """A Flower App folder holding fedpriv's source and a pyproject whose run config is this run's, resolved.

    Built from the installed packages rather than from a checkout, so `fedpriv server` works from a wheel
    too; only .py files go in (Flower ships the folder to every SuperNode, tests and data stay home).
    """
    if where.exists():
        shutil.rmtree(where)
    for name in APP_PACKAGES:
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.submodule_search_locations:
            raise ServerDeployError(f"package {name!r} is not importable; reinstall fedpriv (pip install -e "
                                    ".)")
        src = Path(next(iter(spec.submodule_search_locations)))
        shutil.copytree(src, where / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "tests"))
    try:
        version = importlib.metadata.version("fedpriv")
    except importlib.metadata.PackageNotFoundError:
        version = "0.0.0"
    project = {
        "project": {"name": "fedpriv", "version": version,
                    "description": "fedpriv's ServerApp and ClientApp, as one deployment run"},
        "tool": {"flwr": {"app": {
            "publisher": "fedpriv",
            "components": {"serverapp": "server.app:app", "clientapp": "client.app:app"},
            "config": dict(run_config),
        }}},
    }
    (where / "pyproject.toml").write_text(tomli_w.dumps(project))
    return where


# ---- settings ----------------------------------------------------------------------------------------------

def parse_address(text: str) -> tuple[str, int]:
    host, sep, port = text.strip().rpartition(":")
    host = host.strip("[]")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ServerDeployError(f"--address {text!r} is not HOST:PORT; e.g. --address 0.0.0.0:9092 to serve "
                                "other machines, 127.0.0.1:9092 for this one")
    return host or "0.0.0.0", int(port)


def check_port_free(host: str, port: int) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            raise ServerDeployError(f"cannot listen on {host}:{port} ({exc.strerror}); another server holds "
                                    "the port or the address is not this machine's: choose another "
                                    "--address") from None


@dataclass(frozen=True)
class ServerSettings:
    host: str
    port: int
    certs: CertFiles | None  # None: --insecure
    public_keys: tuple[Path, ...]
    run_dir: Path
    start_clients: int
    start_timeout: float

    @property
    def connect_host(self) -> str:
        """The name this machine's own CLI dials: it must be one the certificate covers."""
        if self.host not in WILDCARD_HOSTS:
            return self.host
        if self.certs is None:
            return "127.0.0.1"
        from cryptography import x509

        from server.certs import cert_hosts

        hosts = cert_hosts(x509.load_pem_x509_certificate(self.certs.server_cert.read_bytes()))
        local = [h for h in ("127.0.0.1", "localhost", "::1") if h in hosts]
        return (local or hosts or ["127.0.0.1"])[0]

    @property
    def deploy_dir(self) -> Path:
        return self.run_dir / "deploy"


def security_from(args: argparse.Namespace, host: str) -> tuple[CertFiles | None, tuple[Path, ...]]:
    if args.insecure and args.certs:
        raise ServerDeployError("--insecure with --certs: choose TLS with authentication (--certs DIR) or "
                                "--insecure (loopback experiments), not both")
    if not args.insecure and not args.certs:
        raise ServerDeployError("no certificates: pass --certs DIR (make one with `fedpriv certs --out DIR "
                                "--hosts HOST --clients N`), or --insecure for a loopback experiment")
    if args.insecure:
        return None, ()
    files = check_server_certs(args.certs, host)
    keys = tuple(files.public_keys())
    if not keys:
        raise ServerDeployError(f"no client public keys in {files.client_keys}: with authentication only "
                                "listed clients may join; put the clients' .pub files there (`fedpriv certs "
                                "--clients N` makes key pairs)")
    for key in keys:
        check_public_key(key)
    return files, keys


# ---- the server --------------------------------------------------------------------------------------------

def loud_insecure_warning() -> None:
    bar = "!" * 100
    print(f"{bar}\n!! --insecure: NO TLS and NO client authentication. Model updates travel in clear text "
          "and ANY SuperNode\n!! that reaches this port can join and submit updates. Use it on loopback "
          "only; for anything else run\n!! `fedpriv certs` and pass "
          f"--certs.\n{bar}", file=sys.stderr, flush=True)


# flower-superlink that holds an empty pull until a message for it is stored (up to 1 s; common/deploy_waits.py):
# a SuperNode's pull for its next message and the ServerApp's pull for replies, instead of answering at once and
# being asked again 0.2 s later. Run with `python -c` so that the SuperLink does not import torch through
# fedpriv's packages.
HOLDING_SUPERLINK = """
import sys
from flwr.superlink.cli import flower_superlink

from common.deploy_waits import hold_empty_pulls

hold_empty_pulls()
sys.argv = ["flower-superlink", *sys.argv[1:]]
sys.exit(flower_superlink())
"""


def start_superlink(settings: ServerSettings, env: Mapping[str, str]) -> subprocess.Popen:
    flower_bin("flower-superlink")  # installed: the same one-line error as before when it is not
    cmd = [sys.executable, "-c", HOLDING_SUPERLINK, "--host", settings.host, "--port", str(settings.port),
           "--disable-runtime-dependency-installation"]
    if settings.certs is None:
        cmd.append("--insecure")
    else:
        cmd += ["--ssl-certfile", str(settings.certs.server_cert),
                "--ssl-keyfile", str(settings.certs.server_key),
                "--ssl-ca-certfile", str(settings.certs.ca_cert), "--enable-supernode-auth"]
    log = settings.deploy_dir / "superlink.log"
    proc = start_group(cmd, env, log)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ServerDeployError(f"the SuperLink exited at start (code {proc.returncode}): "
                                    f"{last_error(log)}")
        with contextlib.suppress(OSError), socket.create_connection((settings.connect_host, settings.port),
                                                                    timeout=1):
            return proc
        time.sleep(0.3)
    stop_group(proc)
    raise ServerDeployError(f"the SuperLink did not open {settings.connect_host}:{settings.port} within 60 "
                            f"s; see {log}")


def admit_clients(cli: FlowerCli, keys: tuple[Path, ...]) -> list[str]:
    """Register every public key with the SuperLink (in parallel: a `flwr` call costs a second or two)."""
    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(lambda key: cli.json("supernode", "register", str(key), CONNECTION, "--name", key.stem),
                      keys))
    return [key.stem for key in keys]


def online_nodes(cli: FlowerCli) -> int:
    nodes = cli.json("supernode", "list", CONNECTION).get("nodes", [])
    return sum(1 for n in nodes if n.get("status") == "online")


def wait_for_clients(cli: FlowerCli, needed: int, timeout: float, superlink: subprocess.Popen,
                     log: Path) -> int:
    deadline, seen = time.monotonic() + timeout, -1
    while True:
        if superlink.poll() is not None:
            raise ServerDeployError(f"the SuperLink stopped (code {superlink.returncode}): {last_error(log)}")
        online = online_nodes(cli)
        if online != seen:
            print(f"clients connected: {online} (need {needed})", flush=True)
            seen = online
        if online >= needed:
            return online
        if time.monotonic() > deadline:
            raise ServerDeployError(f"only {online} of the {needed} clients the run starts with connected "
                                    f"within {timeout:.0f} s; start more clients (fedpriv client), or lower "
                                    "--start-clients / --min-clients")
        time.sleep(2.0)


def _short(reason: str, width: int = 90) -> str:
    reason = " ".join(str(reason).split())
    return reason if len(reason) <= width else reason[: width - 3] + "..."


def describe_round(record: Mapping[str, Any], num_rounds: int) -> str:
    acc = record.get("server", {}).get("accuracy")
    accuracy = f"accuracy {acc:.4f}" if acc is not None else "accuracy n/a"
    parts = [f"round {record['round']}/{num_rounds}", accuracy]
    trained = [e["client_id"] for e in record.get("train", [])]
    parts.append(f"trained: {', '.join(trained) or 'none'}")
    if record.get("missing"):
        parts.append(f"missing: {', '.join(record['missing'])}")
    for key in ("dropped", "refused"):
        said = set()
        for entry in record.get(key, []):
            # A client that refuses a run answers its train and its evaluate message alike: say it once.
            line = f"{key} {entry['client_id']}: {_short(entry['reason'], 160 if key == 'refused' else 90)}"
            if line not in said:
                said.add(line)
                parts.append(line)
    parts.append(f"{record.get('seconds', 0.0):.1f} s")
    return "  ".join(parts)


def follow_run(cli: FlowerCli, run_id: str, settings: ServerSettings, num_rounds: int, env: Mapping[str, str],
               superlink: subprocess.Popen) -> str:
    """Print each round as its record lands; return the run's final status (e.g. 'finished:completed')."""
    metrics = settings.run_dir / "metrics.json"
    log = settings.deploy_dir / "serverapp.log"
    # The ServerApp's own output (Flower's log stream of the run) goes to a file; this process prints rounds.
    log_cmd = [flower_bin("flwr"), "log", run_id, CONNECTION, "--stream"]
    stream = start_group(log_cmd, env, log)
    printed: set[int] = set()
    last_status_check = time.monotonic()
    try:
        while True:
            if metrics.exists():
                with contextlib.suppress(json.JSONDecodeError, OSError):
                    for record in json.loads(metrics.read_text())["rounds"]:
                        if record["round"] >= 1 and record["round"] not in printed:
                            printed.add(record["round"])
                            print(describe_round(record, num_rounds), flush=True)
            if superlink.poll() is not None:
                raise ServerDeployError(f"the SuperLink stopped (code {superlink.returncode}) during the "
                                        f"run: {last_error(settings.deploy_dir / 'superlink.log')}")
            # The log stream ends with the run; a status check now and then covers a stream that broke off.
            if stream.poll() is not None or time.monotonic() - last_status_check > 30:
                last_status_check = time.monotonic()
                status = run_status(cli, run_id)
                if status.startswith("finished"):
                    time.sleep(0.5)  # the last record is written before the run is marked finished
                    return status
                if stream.poll() is not None:
                    stream = start_group(log_cmd, env, log)
            time.sleep(1.0)
    finally:
        stop_group(stream, grace=2)


def run_status(cli: FlowerCli, run_id: str) -> str:
    """'finished:completed', or e.g. 'finished:failed (No heartbeat received from the task)' with Flower's
    status details when it gives any."""
    runs = cli.json("list", CONNECTION, "--run-id", run_id).get("runs", [])
    if not runs:
        return "unknown"
    status, details = str(runs[0].get("status", "unknown")), str(runs[0].get("status-details") or "").strip()
    return f"{status} ({details})" if details and not status.endswith("completed") else status


def run_failure(status: str, log: Path) -> str:
    """Why a run did not complete, in one line: Flower's status, the log's last error, and what to do."""
    hint = ""
    if "heartbeat" in status.lower():
        # Flower marks a run failed when its ServerApp process sends no heartbeat for 2 x 30 s.
        hint = ("; the ServerApp process went quiet for a minute (killed, or starved of CPU on an overloaded "
                "host: fewer clients per machine help)")
    return f"run ended {status}: {last_error(log)}{hint}; full log {log}"


def serve(run_config: Mapping[str, Any], settings: ServerSettings) -> str:
    """The whole server side of one run; returns the final status. Stops everything it started."""
    deploy = settings.deploy_dir
    deploy.mkdir(parents=True, exist_ok=True)
    env = flower_env(deploy / "flwr-home")
    root_cert = settings.certs.ca_cert if settings.certs else None
    write_connection(deploy / "flwr-home", f"{settings.connect_host}:{settings.port}", root_cert)
    cli = FlowerCli(env)
    app_dir = stage_app(run_config, deploy / "app")
    superlink = start_superlink(settings, env)
    run_id = None
    try:
        security = "TLS, SuperNode authentication" if settings.certs else "INSECURE"
        print(f"SuperLink on {settings.host}:{settings.port} ({security}); log {deploy / 'superlink.log'}",
              flush=True)
        if settings.public_keys:
            names = admit_clients(cli, settings.public_keys)
            print(f"admitted clients (public keys): {', '.join(names)}", flush=True)
        wait_for_clients(cli, settings.start_clients, settings.start_timeout, superlink,
                         deploy / "superlink.log")
        run_id = str(cli.json("run", str(app_dir), CONNECTION)["run-id"])
        print(f"run {run_id} started: {run_config['num-rounds']} rounds, records in {settings.run_dir}; "
              f"ServerApp log {deploy / 'serverapp.log'}", flush=True)
        return follow_run(cli, run_id, settings, int(run_config["num-rounds"]), env, superlink)
    finally:
        # Everything the run needs is on disk by now; the SuperLink's graceful stop waits on clients' open
        # connections, which nothing here needs.
        stop_group(superlink, grace=3.0)
