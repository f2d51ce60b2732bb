"""`fedpriv client`: one data owner joins a deployment with its own data file.

It checks what it can before anything starts (the data file loads, the certificates and the key are usable,
the SuperLink answers and presents a certificate the CA vouches for), then runs a Flower SuperNode whose
ClientApp trains on that file, and stays until stopped. What the ClientApp reads comes from the node config
written into the state folder: `data-path`, `client-id`, `state-dir` (the privacy ledger lives there, so a
restarted client resumes its accounting), `budget-epsilon`, `budget-delta`.

Several clients on one host work: each SuperNode's local Runtime API gets a free port of its own.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import queue
import re
import signal
import socket
import ssl
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import tomli_w
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key

from client.trust import TrustedApp, check_bundle, refusal_line
from common.config import ConfigError, DataConfig
from common.datasets import DATASETS
from common.deploy_waits import free_udp_port
from common.devices import check_device_name, resolve_device
from common.localfile import load_local_file
from common.paths import input_file, output_dir
from common.processes import die_with_parent, flower_bin, flower_env, start_group, stop_group
from common.task import file_data

# fork: fedpriv's trusted executor (this machine's ClientApp, forked per message; the default);
# flower: Flower's own (a fresh process per message running the ClientApp the server's bundle ships).
EXECUTORS = ("fork", "flower")
NODE_CONFIG = "node-config.toml"
SUPERNODE_LOG = "supernode.log"
EXECUTOR_LOG = "executor.log"
# Flower's exit code when the SuperLink refuses to activate this SuperNode (an unknown public key, or a
# node whose previous session still counts as online).
EXIT_ACTIVATION_FAILED = 305
REFUSED_PAUSE = 5.0
# How often an idle SuperNode asks the SuperLink for messages: Flower 1.41 sleeps 3 s after an empty pull.
FLOWER_POLL = 3.0
# fedpriv's default: a message waits at most this long to be picked up (two messages a round, each way).
DEFAULT_POLL = 0.2
RECONNECT_WAIT = 10.0
LOST_SUPERLINK = "Giving up reconnection"  # what a SuperNode logs when RECONNECT_WAIT has passed
ANSI = re.compile(r"\x1b\[[0-9;]*m")
# The last line of a traceback: the exception a ClientApp raised, e.g. "common.datasets.DataError: ...".
EXCEPTION_LINE = re.compile(r"^[\w.]*(Error|Exception): ")


class ClientDeployError(ConfigError):
    """A client that cannot start as asked; the message names the value and the fix."""


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


# ---- checks before anything starts -------------------------------------------------------------------------

def parse_address(text: str) -> tuple[str, int]:
    host, sep, port = text.strip().rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ClientDeployError(f"--superlink {text!r} is not HOST:PORT; give the server's address, "
                                "e.g. --superlink server.example.org:9092")
    return host, int(port)


def check_root_cert(path: Path) -> None:
    """The CA certificate is there, parses and is in date (an expired CA fails every handshake)."""
    fix = "copy ca.crt from the server's `fedpriv certs` folder"
    if not path.is_file():
        raise ClientDeployError(f"CA certificate {path} is missing; {fix}")
    try:
        cert = x509.load_pem_x509_certificate(path.read_bytes())
    except ValueError:
        raise ClientDeployError(f"{path} is not a PEM certificate; {fix}") from None
    now = time.time()
    if cert.not_valid_after_utc.timestamp() < now:
        raise ClientDeployError(f"CA certificate {path} expired on {cert.not_valid_after_utc:%Y-%m-%d}; ask "
                                "the server operator for new certificates (fedpriv certs)")
    if cert.not_valid_before_utc.timestamp() > now:
        raise ClientDeployError(f"CA certificate {path} is not valid before "
                                f"{cert.not_valid_before_utc:%Y-%m-%d}; check this machine's clock")


def check_auth_key(path: Path) -> None:
    """An OpenSSH EC private key, the kind `flower-supernode --auth-supernode-private-key` reads."""
    fix = "use the client-keys/<name>.key file `fedpriv certs --clients N` made for this client"
    if not path.is_file():
        raise ClientDeployError(f"authentication key {path} is missing; {fix}")
    try:
        key = load_ssh_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise ClientDeployError(f"{path} is not an unencrypted OpenSSH private key; {fix}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ClientDeployError(f"{path} is not an EC key; SuperNode authentication needs one on a NIST "
                                f"curve; {fix}")


def check_superlink(host: str, port: int, root_cert: Path | None, timeout: float = 5.0) -> None:
    """The SuperLink answers at host:port and, with TLS, proves it is the server the CA certified."""
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except socket.gaierror:
        raise ClientDeployError(f"--superlink {host}:{port}: unknown host {host!r}; check the server's "
                                "name") from None
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise ClientDeployError(f"cannot reach the SuperLink at {host}:{port} ({reason}); check the address "
                                "and that `fedpriv server` is running there") from None
    with sock:
        if root_cert is None:
            return
        context = ssl.create_default_context(cafile=str(root_cert))
        try:
            with context.wrap_socket(sock, server_hostname=host):
                pass
        except ssl.SSLCertVerificationError as exc:
            raise ClientDeployError(f"the SuperLink at {host}:{port} presented a certificate {root_cert} "
                                    f"does not vouch for ({exc.verify_message}); use the ca.crt of that "
                                    f"server's certificates, made for the host name {host!r}") from None
        except (ssl.SSLError, OSError) as exc:
            raise ClientDeployError(f"TLS with the SuperLink at {host}:{port} failed ({exc}); is it running "
                                    "with --insecure? Then pass --insecure here too (loopback only)") \
                from None


def check_data(path: Path, dataset: str | None) -> str:
    """The file loads; with --dataset, its shape and labels fit that task. Returns a one-line summary."""
    x, y = load_local_file(path)
    if dataset:
        if dataset not in DATASETS:
            raise ClientDeployError(f"--dataset {dataset!r} is unknown; choose one of: {', '.join(DATASETS)}")
        file_data(path, DataConfig(dataset=dataset))  # raises DataError naming the shape or label problem
    return f"{len(y)} examples of shape {tuple(x.shape[1:])}, labels {int(y.min())}..{int(y.max())}"


# ---- the client --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ClientSettings:
    superlink: str
    data: Path
    state_dir: Path
    client_id: str
    root_cert: Path | None = None
    key: Path | None = None
    insecure: bool = False
    budget_epsilon: float | None = None
    budget_delta: float | None = None
    dataset: str | None = None
    port: int | None = None
    threads: int | None = None
    executor: str = "fork"
    retry_refused: float = 90.0
    wait_superlink: float = 30.0
    poll_interval: float = DEFAULT_POLL
    device: str = "cpu"

    def __post_init__(self) -> None:
        parse_address(self.superlink)
        # This machine's hardware, checked before anything starts; "cpu" needs no torch in this process, which
        # only supervises the SuperNode and the executor (torch would add about 300 MB to every client).
        if check_device_name(self.device, "--device") != "cpu":
            resolve_device(self.device, "--device")
        if self.insecure and (self.root_cert or self.key):
            raise ClientDeployError("--insecure with certificates or a key: choose TLS (--certs, or "
                                    "--root-cert and --key) or --insecure, not both")
        if not self.insecure and self.root_cert is None:
            raise ClientDeployError("no CA certificate: pass --certs DIR (or --root-cert FILE), or "
                                    "--insecure for a loopback experiment")
        if self.budget_epsilon is not None and self.budget_epsilon <= 0:
            raise ClientDeployError(f"--budget-epsilon {self.budget_epsilon} must be > 0, e.g. 3.0")
        if self.budget_delta is not None and not 0 < self.budget_delta < 1:
            raise ClientDeployError(f"--budget-delta {self.budget_delta} must be in (0, 1), e.g. 1e-5")
        if self.budget_delta is not None and self.budget_epsilon is None:
            raise ClientDeployError("--budget-delta without --budget-epsilon; give both, e.g. "
                                    "--budget-epsilon 3 --budget-delta 1e-5")
        if not 0.05 <= self.poll_interval <= FLOWER_POLL:
            raise ClientDeployError(f"--poll-interval {self.poll_interval} is out of range; give seconds in "
                                    f"[0.05, {FLOWER_POLL}], e.g. 0.5")
        if self.executor not in EXECUTORS:
            raise ClientDeployError(f"--executor {self.executor!r} is unknown; choose one of: "
                                    f"{', '.join(EXECUTORS)}")
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", self.client_id):
            raise ClientDeployError(f"client id {self.client_id!r} is not allowed; use letters, digits, '.', "
                                    "'_' and '-' (it names the ledger file), e.g. --client-id hospital-3")

    def node_config(self) -> dict[str, str | float]:
        config: dict[str, str | float] = {"data-path": str(self.data), "client-id": self.client_id,
                                          "state-dir": str(self.state_dir), "device": self.device}
        if self.budget_epsilon is not None:
            config["budget-epsilon"] = float(self.budget_epsilon)
        if self.budget_delta is not None:
            config["budget-delta"] = float(self.budget_delta)
        return config


def settings_from(args: argparse.Namespace) -> ClientSettings:
    data = input_file(args.data, "--data", "owner's .npz or .csv file")
    client_id = args.client_id or data.stem
    root_cert = Path(args.root_cert).expanduser().resolve() if args.root_cert else None
    key = Path(args.key).expanduser().resolve() if args.key else None
    if args.certs:
        certs = Path(args.certs).expanduser().resolve()
        if not certs.is_dir():
            raise ClientDeployError(f"--certs {certs} is not a folder; give the folder `fedpriv certs` made")
        root_cert = root_cert or certs / "ca.crt"
        if key is None:
            key = certs / "client-keys" / f"{client_id}.key"
            if not key.is_file():
                raise ClientDeployError(f"no key for client {client_id!r} in {certs / 'client-keys'}; pass "
                                        "--key FILE, or --client-id naming one of the keys there")
    state_dir = output_dir(args.state_dir, "--state-dir")
    return ClientSettings(superlink=args.superlink, data=data, state_dir=state_dir, client_id=client_id,
                          root_cert=root_cert, key=key, insecure=args.insecure,
                          budget_epsilon=args.budget_epsilon, budget_delta=args.budget_delta,
                          dataset=args.dataset, port=args.port, threads=args.threads,
                          executor="flower" if args.allow_server_code else "fork",
                          retry_refused=args.retry_refused, wait_superlink=args.wait_superlink,
                          poll_interval=args.poll_interval, device=args.device)


def wait_for_superlink(host: str, port: int, root_cert: Path | None, wait: float) -> None:
    """check_superlink, retried for `wait` seconds while nothing listens there (a client may start before
    its server); an unknown host or a certificate the CA does not vouch for fails at once."""
    deadline = time.monotonic() + wait
    while True:
        try:
            check_superlink(host, port, root_cert)
            return
        except ClientDeployError as exc:
            if "cannot reach" not in str(exc) or time.monotonic() >= deadline:
                raise
        time.sleep(1.0)


def preflight(settings: ClientSettings) -> str:
    """Every check that can fail before a SuperNode starts; returns the data summary."""
    summary = check_data(settings.data, settings.dataset)
    if settings.root_cert is not None:
        check_root_cert(settings.root_cert)
    if settings.key is not None:
        check_auth_key(settings.key)
    host, port = parse_address(settings.superlink)
    wait_for_superlink(host, port, settings.root_cert, settings.wait_superlink)
    return summary


# flower-supernode with its waits capped at argv[1] seconds. Flower 1.41's SuperNode sleeps 3 s after every
# pull that brings no message and 0.5 s between looks for the ClientApp's reply: up to 3.5 s of latency per
# message, twice a round. Those are `time.sleep` calls of flwr.supernode.start_client_internal, so that
# module alone gets a `time` whose sleep is capped (should a later Flower move them, this does nothing rather
# than fail). The price: a SuperNode sends 1/poll small requests a second instead of 1/3, each costing the
# SuperLink too (3.4% of a core per client at 0.2 s), so after IDLE_AFTER s of empty pulls (Flower's 3 s sleep
# asked for that many times in a row) it pulls every IDLE_POLL s until a message comes. Its waits for a
# message's objects start at 10 ms instead of 1 s, and each stored message wakes the fork executor listening on
# UDP port argv[2] (0: none; common/deploy_waits.py). Run with `python -c` so that the SuperNode does not import
# torch through the client package.
POLLING_SUPERNODE = """
import sys, time
import flwr.supernode.start_client_internal as loop
from flwr.supernode.cli import flower_supernode

from common.deploy_waits import shorten_object_waits, supernode_wait, wake_on_message

cap, wake_port = float(sys.argv[1]), int(sys.argv[2])


class CappedTime:
    empty_pulls = 0  # Flower's 3 s sleeps in a row: pulls that brought no message

    def __getattr__(self, name):
        return getattr(time, name)

    @classmethod
    def sleep(cls, seconds):
        cls.empty_pulls = cls.empty_pulls + 1 if seconds >= 3 else 0
        time.sleep(supernode_wait(seconds, cap, cls.empty_pulls))


loop.time = CappedTime()
shorten_object_waits()
if wake_port:
    wake_on_message(wake_port)
sys.argv = ["flower-supernode", *sys.argv[3:]]
flower_supernode()
"""


def wake_port_for(settings: ClientSettings) -> int | None:
    """The UDP port on which the fork executor hears of each stored message: only where both ends are fedpriv's
    (the fork executor, and the SuperNode with shortened waits; Flower's own 3 s SuperNode sends nothing)."""
    if settings.executor != "fork" or settings.poll_interval == FLOWER_POLL:
        return None
    return free_udp_port()


def supernode_command(settings: ClientSettings, port: int, node_config: Path,
                      wake_port: int | None = None) -> list[str]:
    if settings.poll_interval == FLOWER_POLL:
        cmd = [flower_bin("flower-supernode")]
    else:  # the same SuperNode, through a few lines that shorten its waits
        cmd = [sys.executable, "-c", POLLING_SUPERNODE, str(settings.poll_interval), str(wake_port or 0)]
    cmd += ["--superlink", settings.superlink, "--node-config", str(node_config), "--port", str(port),
            # Give up on a lost SuperLink after RECONNECT_WAIT s instead of retrying forever: a restarted
            # server does not know this node's session anyway, and a fresh SuperNode (run_supernode starts
            # one) joins it at once instead of after Flower's backoff of up to 20 s and more between tries.
            "--max-wait-time", str(RECONNECT_WAIT)]
    if settings.insecure:
        cmd.append("--insecure")
    else:
        cmd += ["--root-certificates", str(settings.root_cert)]
    if settings.key is not None:
        cmd += ["--auth-supernode-private-key", str(settings.key)]
    if settings.executor == "fork":
        cmd += ["--isolation", "process"]
    return cmd


def write_node_config(settings: ClientSettings) -> Path:
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    path = settings.state_dir / NODE_CONFIG
    # A TOML file rather than `--node-config 'k=v ...'`: any character in a path survives it unquoted.
    path.write_text(tomli_w.dumps(settings.node_config()))
    return path


def _pump(stream, sink: queue.Queue) -> None:
    for raw in iter(stream.readline, b""):
        sink.put(ANSI.sub("", raw.decode(errors="replace")).rstrip("\n"))
    sink.put(None)


def _explain(line: str, run: list[str]) -> str | None:
    """The SuperNode log lines a data owner wants to see, in a few words (run[0]: the last run id seen)."""
    if m := re.search(r"SuperNode ID: (\d+)", line):
        return f"connected as node {m.group(1)}"
    if m := re.search(r"\[RUN (\d+)", line):
        run[0] = m.group(1)
        return None
    if m := re.search(r"Receiving: ([\w.]+) message", line):  # e.g. train, query.secagg_setup
        return f"run {run[0]}: {m.group(1)} message"
    return _error(line)


def _error(line: str) -> str | None:
    if line.startswith("REFUSED "):
        return line.strip()
    if "ERROR" in line or "Exit Code" in line or EXCEPTION_LINE.match(line):
        return line.strip()
    return None


def _read_new(path: Path, offset: int) -> tuple[list[str], int]:
    """Lines appended to `path` since `offset` (the fork executor's tasks log there, not to the SuperNode)."""
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read()
    except FileNotFoundError:
        return [], offset
    complete = data[: data.rfind(b"\n") + 1]
    lines = [ANSI.sub("", raw) for raw in complete.decode(errors="replace").splitlines()]
    return lines, offset + len(complete)


def _run_once(settings: ClientSettings, node_config: Path, port: int, env: dict[str, str],
              echo: bool, wake_port: int | None) -> tuple[int, bool]:
    """One SuperNode until it exits or loses its SuperLink for good.
    Returns (exit code, whether the SuperLink refused this client's key)."""
    proc = start_group(supernode_command(settings, port, node_config, wake_port), env, pipe=True)
    (settings.state_dir / "supernode.pid").write_text(str(proc.pid))
    lines: queue.Queue = queue.Queue()
    # A reader thread, because Flower's own children inherit the pipe: EOF comes only when all of them are
    # gone, and they outlive the SuperNode by a while; the SuperNode's exit is what ends this loop.
    threading.Thread(target=_pump, args=(proc.stdout, lines), daemon=True).start()
    refused, lost, run = False, False, ["?"]
    said_before: set[str] = set()  # a refused run answers every message alike: say it once
    tasks_log = settings.state_dir / EXECUTOR_LOG
    offset = tasks_log.stat().st_size if tasks_log.exists() else 0
    try:
        with open(settings.state_dir / SUPERNODE_LOG, "a", encoding="utf-8") as log:
            while True:
                if echo and settings.executor == "fork":
                    new, offset = _read_new(tasks_log, offset)
                    for said in filter(None, map(_error, new)):
                        if said.startswith("REFUSED ") and said in said_before:
                            continue
                        said_before.add(said)
                        print(f"{settings.client_id}: {said}", flush=True)
                try:
                    line = lines.get(timeout=0.5)
                except queue.Empty:
                    if proc.poll() is not None:
                        break
                    continue
                if line is None:
                    break
                log.write(f"{time.strftime('%H:%M:%S')} {line}\n")
                log.flush()
                refused = refused or "Failed to activate SuperNode" in line
                if echo and (said := _explain(line, run)):
                    print(f"{settings.client_id}: {said}", flush=True)
                if LOST_SUPERLINK in line:
                    # After giving up, Flower 1.41's SuperNode logs the error but its process lives on (its
                    # Runtime API thread): it would never exit by itself. Its session is lost anyway.
                    lost = True
                    break
    finally:
        stop_group(proc, grace=1.0 if lost else 5.0)
    return proc.returncode, refused or proc.returncode == EXIT_ACTIVATION_FAILED


def run_supernode(settings: ClientSettings, echo: bool = True, restart: bool = True) -> int:
    """Keep a SuperNode connected until this process is stopped; returns the last exit code.

    A SuperNode exits when the SuperLink it knew is gone for good (a restarted server has a fresh state and
    does not know its node id): then a new one starts and joins the new SuperLink with the same key.
    A refusal to activate is retried for `settings.retry_refused` seconds before it is an error, because
    Flower gives the same answer for an unknown key and for a node whose previous session still counts as
    online (up to two 30 s heartbeat intervals after a crash), and a restarting server admits its keys a
    moment after it starts listening.
    """
    node_config = write_node_config(settings)
    # One port and one executor for the whole life of this client: a new SuperNode serves its Runtime API on
    # the same port, so the executor (whose imports are the slow part) just goes on asking it for tasks.
    port = settings.port or free_port()
    env = flower_env(settings.state_dir / "flwr-home", settings.threads)
    executor = None
    wake_port = wake_port_for(settings)  # the same for every SuperNode this client starts
    if settings.executor == "fork":
        cmd = [sys.executable, "-m", "client.deploy", "fork-executor", f"127.0.0.1:{port}", str(wake_port or 0)]
        executor = start_group(cmd, env,
                               log=settings.state_dir / EXECUTOR_LOG)
        (settings.state_dir / "executor.pid").write_text(str(executor.pid))
    try:
        return _keep_supernode(settings, node_config, port, env, echo, restart, wake_port)
    finally:
        if executor is not None:
            stop_group(executor, grace=1.0)


def _keep_supernode(settings: ClientSettings, node_config: Path, port: int, env: dict[str, str], echo: bool,
                    restart: bool, wake_port: int | None = None) -> int:
    refused_since: float | None = None
    pause = 2.0
    while True:
        started = time.monotonic()
        code, refused = _run_once(settings, node_config, port, env, echo, wake_port)
        if refused:
            refused_since = refused_since if refused_since is not None else started
            left = settings.retry_refused - (time.monotonic() - refused_since)
            if left <= 0:
                pub = Path(str(settings.key or "KEY")).with_suffix(".pub").name
                raise ClientDeployError(f"the SuperLink at {settings.superlink} refused this client's key "
                                        f"({settings.key or 'none given'}); it admits only the public keys "
                                        f"it was given: send the server operator {pub}")
            if refused_since == started:
                print(f"{settings.client_id}: the SuperLink refused to activate this node (an unknown key, "
                      f"or this client's previous session still counts as online); retrying for {left:.0f} s",
                      flush=True)
            time.sleep(min(REFUSED_PAUSE, left))
            continue
        refused_since = None
        if not restart:
            return code
        # Back off while SuperNodes die young, so a persistent failure does not spin.
        pause = 2.0 if time.monotonic() - started > 60 else min(pause * 2, 60.0)
        print(f"{settings.client_id}: the SuperNode exited (code {code}); starting a new one in {pause:.0f} "
              f"s (log: {settings.state_dir / SUPERNODE_LOG})", flush=True)
        time.sleep(pause)


def warm_optimizer() -> None:
    """One optimizer step on a throwaway parameter. A process's first step imports torch's compiler stack
    (torch._dynamo: 0.4-0.6 s here); done once in the executor, every forked task inherits it instead of paying
    it on each train message (measured: a digits train task's ClientApp took 0.7-0.8 s, of which 0.02 s work)."""
    import torch

    weight = torch.nn.Parameter(torch.zeros(1))
    weight.grad = torch.ones(1)
    torch.optim.SGD([weight], lr=0.1, momentum=0.9).step()


def serve_forked_tasks(runtime_api_address: str, wake_port: int = 0) -> None:
    """The fork executor: what flower-superexec does for a SuperNode with `--isolation process`, except that
    each task runs in a child forked from this process, which has imported torch, Flower, Opacus and the
    ClientApp once (and taken one optimizer step), instead of in a fresh interpreter that
    imports them all again for every message.

    With `wake_port`, it asks for a task when its SuperNode says a message is stored (a datagram on that
    loopback port) and otherwise every WAKE_FALLBACK s; without, every 50 ms while busy (executor_wait).

    Built on Flower's own pieces for this (the Runtime API client, AcquireTask, run_clientapp), which are
    internal to Flower 1.41 (pinned). The children run this machine's installed fedpriv ClientApp, so
    client and server must run the same fedpriv version.
    """
    from flwr.proto.runtime_pb2 import AcquireTaskRequest
    from flwr.supercore.constant import TaskType
    from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor
    from flwr.supercore.retry import make_simple_http_retry_invoker
    from flwr.supercore.runtime import RuntimeHttpClient
    from flwr.supernode.runtime.run_clientapp import run_clientapp

    import client.app  # noqa: F401  (imported for its side effect: everything a task needs, once)
    import client.dpsgd  # noqa: F401  (Opacus: client.app imports it lazily, at a DP round; every child inherits it)
    from common.deploy_waits import WAKE_FALLBACK, WakeListener, executor_wait, shorten_object_waits

    trusted = TrustedApp.installed()  # hashed once, from the code this process has imported
    shorten_object_waits()  # every forked task inherits it
    warm_optimizer()
    # No dataset is loaded here: a deployed client trains on its own file, checked against the task's spec.
    runtime = RuntimeHttpClient.from_server_address(
        server_address=runtime_api_address, insecure=True, root_certificates=None,
        interceptors=[RuntimeVersionHttpInterceptor(component_name="SuperExec")],
        retry_invoker=make_simple_http_retry_invoker())
    wake = None
    if wake_port:
        try:
            wake = WakeListener(wake_port)
        except OSError as exc:  # taken since the client chose it: polling still finds every task
            print(f"wake-ups off (UDP port {wake_port}: {exc}); asking for tasks every 50 ms", flush=True)
    parent = os.getpid()
    children: set[int] = set()
    last_active = time.monotonic()
    while True:
        try:
            res = runtime.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP],
                                                         agentapp_fab_hashes=[]))
        except Exception:  # noqa: BLE001 - the SuperNode is restarting: ask its successor on the same port
            time.sleep(1.0)
            continue
        if res.HasField("task") and res.token:
            started = last_active = time.monotonic()
            pid = os.fork()
            if pid == 0:  # the child: one task, then exit without running the parent's cleanup
                code = 1
                try:
                    # Dies with the executor (a crashed client leaves no task behind); the kernel forgets
                    # PDEATHSIG across fork, hence set again here, and the check covers a parent gone already.
                    die_with_parent()
                    if os.getppid() != parent:
                        os._exit(1)
                    times = trust_only(trusted)
                    run_clientapp(runtime_api_address=runtime_api_address, token=res.token, insecure=True,
                                  certificates=None, parent_pid=parent, runtime_dependency_install=False)
                    code = 0
                except SystemExit as exc:
                    code = exc.code if isinstance(exc.code, int) else 0
                finally:
                    # Where a task's time goes (benchmarks/deploy_rounds.py reads these lines).
                    with contextlib.suppress(Exception):
                        end = time.monotonic()
                        print(f"TIMING task {end - started:.3f} s: pull {times['pulled'] - started:.3f}, "
                              f"check {times['checked'] - times['pulled']:.3f}, app {times['app']:.3f}, "
                              f"reply {end - times['app_end']:.3f}", flush=True)
                    sys.stdout.flush()
                    sys.stderr.flush()
                    os._exit(code)
            children.add(pid)
        for pid in list(children):
            with contextlib.suppress(ChildProcessError):
                if os.waitpid(pid, os.WNOHANG)[0]:
                    children.discard(pid)
        if children:  # a task still running: its run is busy with this client
            last_active = time.monotonic()
        if wake is not None:
            # No ask while a task runs: the SuperNode takes the next message only after this one's reply.
            wake.wait(WAKE_FALLBACK)
        else:
            time.sleep(executor_wait(time.monotonic() - last_active))


def trust_only(trusted: TrustedApp) -> dict[str, float]:
    """In a forked task child, before Flower's run_clientapp: it still pulls the message, the context and the
    run's bundle and pushes the reply, but it neither installs the bundle nor imports code from it. The bundle
    is checked against this machine's fedpriv (client.trust): when it matches, this process's own ClientApp
    (imported before the fork) answers; when not, every message gets a reply that names the client and says
    why it refused, and one line goes to the executor's log. The two names are module globals of Flower
    1.41's run_clientapp (pinned); should they move, this raises rather than run the bundle's code."""
    import flwr.supernode.runtime.run_clientapp as task
    from flwr.app import ConfigRecord, Context, Message, RecordDict

    from client.app import app as installed_app

    for name in ("install_from_fab", "get_load_client_app_fn"):
        if not hasattr(task, name):
            raise RuntimeError(f"flwr.supernode.runtime.run_clientapp.{name} is gone: this Flower is not the "
                               "one fedpriv's trusted executor was written for (1.41); not running the task")
    verdict: list[str | None] = []
    times: dict[str, float] = {}

    def check_only(fab: bytes, *args: object, **kwargs: object) -> None:
        times["pulled"] = time.monotonic()
        verdict.append(check_bundle(fab, trusted))
        times["checked"] = time.monotonic()

    def timed_app(message: Message, context: Context) -> Message:
        start = time.monotonic()
        try:
            return installed_app(message, context)
        finally:
            times["app_end"] = time.monotonic()
            times["app"] = times["app_end"] - start

    def refusing_app(message: Message, context: Context) -> Message:
        client_id = str(context.node_config.get("client-id", context.node_id))
        reason = str(verdict[0])
        line = refusal_line(client_id, context.run_id, reason, trusted)
        print(line, flush=True)
        meta = ConfigRecord({"client-id": client_id, "refused": f"untrusted app: {reason}"})
        return Message(RecordDict({"meta": meta}), reply_to=message)

    def load(**kwargs: object):  # noqa: ANN202 - Flower's loader factory
        return lambda *ids: timed_app if verdict and verdict[0] is None else refusing_app

    task.install_from_fab = check_only
    task.get_load_client_app_fn = load
    return times


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("client", help="join a deployment as one data owner (a Flower SuperNode)",
                              description="Start a Flower SuperNode whose ClientApp trains on this data "
                                          "owner's own file, with its own privacy budget and ledger.")
    p.add_argument("--superlink", required=True, metavar="HOST:PORT", help="the server's address")
    p.add_argument("--data", required=True, help="this owner's .npz (arrays x, y) or .csv (a 'label' column)")
    p.add_argument("--client-id", help="this owner's name in the records (default: the data file's stem)")
    p.add_argument("--state-dir", required=True,
                   help="folder for the privacy ledger, the node config and the logs")
    tls = p.add_argument_group("security (TLS and SuperNode authentication)")
    tls.add_argument("--certs", help="a `fedpriv certs` folder: uses ca.crt and client-keys/<client-id>.key")
    tls.add_argument("--root-cert", help="the CA certificate that signed the server's certificate")
    tls.add_argument("--key", help="this client's OpenSSH private key for SuperNode authentication")
    tls.add_argument("--insecure", action="store_true",
                     help="no TLS, no authentication: loopback experiments only")
    priv = p.add_argument_group("this owner's privacy budget")
    priv.add_argument("--budget-epsilon", type=float,
                      help="refuse rounds that would take this client past it")
    priv.add_argument("--budget-delta", type=float, help="the delta of the budget (default: the run's delta)")
    more = p.add_argument_group("more")
    more.add_argument("--dataset", help="check before starting that the file fits this task (shape, labels)")
    more.add_argument("--port", type=int,
                      help="local port of the SuperNode's Runtime API (default: a free one)")
    more.add_argument("--device", default="cpu", metavar="auto|cpu|cuda[:N]",
                      help="where this client trains (default cpu; auto: the first GPU when there is one)")
    more.add_argument("--threads", type=int,
                      help="torch threads per ClientApp (several clients on one host: 1)")
    trust = p.add_argument_group("which code touches the data")
    trust.add_argument("--allow-server-code", action="store_true",
                       help="run the ClientApp the SERVER ships with each run (Flower's own executor, a fresh "
                            "process per message), instead of this machine's installed fedpriv: the server "
                            "then decides what code reads this data and enforces its budget. Default: run "
                            "only the installed ClientApp, and refuse runs whose app differs from it")
    more.add_argument("--poll-interval", type=float, default=DEFAULT_POLL, metavar="SECONDS",
                      help=f"how often an idle SuperNode asks for messages (default {DEFAULT_POLL}; Flower's "
                           f"own is {FLOWER_POLL:.0f}: fewer small requests, up to {FLOWER_POLL:.0f} s more "
                           "per message)")
    more.add_argument("--wait-superlink", type=float, default=30.0, metavar="SECONDS",
                      help="how long to wait for the SuperLink to listen before giving up (default 30)")
    more.add_argument("--retry-refused", type=float, default=90.0, metavar="SECONDS",
                      help="how long to retry when the SuperLink refuses this node (default 90: a crashed "
                           "client's old session counts as online for up to 60 s)")
    p.set_defaults(func=run_client)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def run_client(args: argparse.Namespace) -> int:
    settings = settings_from(args)
    summary = preflight(settings)
    if settings.insecure:
        print("WARNING: --insecure: no TLS and no authentication; anyone on the path can read the model "
              "updates and impersonate either side. Use it on loopback only.", file=sys.stderr)
    print(f"{settings.client_id}: data {settings.data}: {summary}")
    print(f"{settings.client_id}: state (ledger, logs) in {settings.state_dir}")
    if settings.executor == "fork":
        print(f"{settings.client_id}: runs only this machine's {TrustedApp.installed().describe()}; runs whose "
              "app differs are refused")
    else:
        print(f"WARNING: --allow-server-code: this client runs whatever ClientApp the server ships; the server "
              f"decides what code reads {settings.data} and whether the budget is enforced", file=sys.stderr)
    # SIGTERM ends the client as Ctrl-C does, through the finally clause that stops the SuperNode.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        run_supernode(settings)
    except KeyboardInterrupt:
        print(f"{settings.client_id}: stopped; the ledger in {settings.state_dir} is kept for the next start",
              file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    # Started by `fedpriv client` (the trusted executor), not by hand.
    if len(sys.argv) in (3, 4) and sys.argv[1] == "fork-executor":
        serve_forked_tasks(sys.argv[2], int(sys.argv[3]) if len(sys.argv) == 4 else 0)
    else:
        sys.exit("usage: python -m client.deploy fork-executor RUNTIME_API_ADDRESS [WAKE_PORT]")
