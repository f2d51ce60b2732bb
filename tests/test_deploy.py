"""A real deployment on loopback: `fedpriv server` (a Flower SuperLink with TLS and SuperNode authentication)
and three `fedpriv client`s (Flower SuperNodes), with sample-level DP, a client crashed mid-round, an
unknown client refused, the server killed and resumed, and the crashed client restarted with its ledger.

Every process is started as the leader of its own process group and stopped by PID in `finally`; the test
also checks that nothing it started is left running.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from client.split import split_dataset
from server.certs import CertFiles, create_certs, make_client_keys

ROOT = Path(__file__).resolve().parents[1]
FLOWER = Path(sys.executable).parent / "flower-superlink"

pytestmark = pytest.mark.skipif(not FLOWER.exists(),
                                reason="flower-superlink is not installed next to this python")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Processes:
    """The processes this test started, each the leader of its own group, all stopped at the end."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.started: list[subprocess.Popen] = []

    def fedpriv(self, name: str, *args: str, env: dict[str, str] | None = None,
                cwd: Path = ROOT) -> subprocess.Popen:
        env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1", **(env or {})}
        out = open(self.logs / f"{name}.out", "ab")  # noqa: SIM115 - the child holds it; closed below
        try:
            proc = subprocess.Popen([sys.executable, "-m", "simulations.cli", *args], cwd=cwd, env=env,
                                    stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        finally:
            out.close()
        self.started.append(proc)
        return proc

    def output(self, name: str) -> str:
        return (self.logs / f"{name}.out").read_text(errors="replace")

    @staticmethod
    def kill(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=15)

    def stop_all(self) -> None:
        """SIGTERM to every group (a clean stop), SIGKILL to whatever still runs 5 s later."""
        for proc in self.started:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 5
        for proc in self.started:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            self.kill(proc, signal.SIGKILL)


def _kill_client(procs: Processes, client: subprocess.Popen, state_dir: Path) -> None:
    """A crash: SIGKILL to `fedpriv client` and to its SuperNode's and executor's process groups at once."""
    groups = [client.pid]
    for pid_file in ("supernode.pid", "executor.pid"):
        with contextlib.suppress(FileNotFoundError, ValueError):
            groups.append(int((state_dir / pid_file).read_text()))
    for pgid in groups:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)
    client.wait(timeout=15)


def _wait(what: str, done: Callable[[], bool], timeout: float, alive: list[subprocess.Popen],
          procs: Processes, poll: float = 0.5) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        for proc in alive:
            if proc.poll() is not None:
                name = " ".join(proc.args[3:5])
                raise AssertionError(f"waiting for {what}: `{name}` exited with {proc.returncode}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(poll)


def _rounds(run_dir: Path) -> list[dict]:
    try:
        return json.loads((run_dir / "metrics.json").read_text())["rounds"]
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return []


def _checkpoint_round(run_dir: Path) -> int:
    try:
        return int(torch.load(run_dir / "checkpoint.pt", weights_only=False)["round"])
    except (FileNotFoundError, EOFError, RuntimeError, KeyError):
        return -1


def _our_processes(marker: str) -> list[str]:
    """Command lines of live processes whose command line or environment (FLWR_HOME, which every Flower
    process of this deployment inherits) mentions this test's folder; zombies excluded."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            if (entry / "stat").read_text().split(") ")[-1].startswith("Z"):
                continue
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            if marker in cmd or marker.encode() in (entry / "environ").read_bytes():
                found.append(cmd)
    return found


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses /proc and process groups")
def test_deployment_with_tls_auth_dp_a_crashed_client_and_a_resumed_server(tmp_path: Path) -> None:
    certs = create_certs(tmp_path / "certs", ["localhost", "127.0.0.1"], clients=3)
    intruder_key, _ = make_client_keys(CertFiles(tmp_path / "intruder"), "intruder")  # never admitted
    files = split_dataset("digits", 3, "iid", tmp_path / "data", seed=7)
    run_dir, logs = tmp_path / "run", tmp_path / "logs"
    logs.mkdir()
    address = f"127.0.0.1:{_free_port()}"
    procs = Processes(logs)
    server_args = ["server", "--certs", str(certs.root), "--address", address, "--round-timeout", "30",
                   "--start-clients", "3", "--start-timeout", "120"]

    def client(i: int) -> subprocess.Popen:
        return procs.fedpriv(f"client-{i}", "client", "--superlink", address, "--certs", str(certs.root),
                             "--data", str(files[i].path), "--state-dir", str(tmp_path / f"state-{i}"),
                             "--threads", "1", "--dataset", "digits")

    try:
        server = procs.fedpriv("server", *server_args, "--dataset", "digits", "--model", "mlp",
                               "--rounds", "3", "--min-clients", "2", "--out", str(run_dir), "--seed", "7",
                               "--set", "dp=sample", "--set", "noise-multiplier=1.0",
                               "--set", "max-grad-norm=1.0", "--set", "fraction-evaluate=1.0")
        # Clients start with the server: they wait for it to listen and retry until their keys are admitted.
        clients = [client(i) for i in range(3)]
        _wait("the server to admit its clients", lambda: "admitted clients" in procs.output("server"), 90,
              [server], procs)
        intruder = procs.fedpriv("intruder", "client", "--superlink", address,
                                 "--root-cert", str(certs.ca_cert), "--key", str(intruder_key),
                                 "--data", str(files[0].path), "--client-id",
                                 "intruder", "--state-dir", str(tmp_path / "state-intruder"),
                                 "--retry-refused", "0")

        # An unknown key is refused: a one-line error on the client, the refusal in the SuperLink's log.
        assert intruder.wait(timeout=120) == 2
        assert "refused this client's key" in procs.output("intruder")
        superlink_log = run_dir / "deploy" / "superlink.log"
        assert "No SuperNode found with the given public key" in superlink_log.read_text()

        # Round 1 with all three; in round 2, client-2 crashes once its training message has arrived.
        _wait("round 1", lambda: len(_rounds(run_dir)) >= 2, 150, [server, *clients], procs)
        state2 = tmp_path / "state-2"
        _wait("client-2's second train message",
              lambda: procs.output("client-2").count("train message") >= 2, 60, [server, *clients], procs,
              poll=0.1)  # kill it while it trains
        _kill_client(procs, clients[2], state2)
        clients[2] = client(2)  # restarted at once: it rejoins when the SuperLink lets its old session go

        # Round 2 completes with the other two, and says who was missing.
        _wait("round 2's checkpoint", lambda: _checkpoint_round(run_dir) == 2, 120, [server, *clients[:2]],
              procs)
        round2 = _rounds(run_dir)[2]
        assert sorted(e["client_id"] for e in round2["train"]) == ["client-0", "client-1"]
        absent = set(round2["missing"]) | {d["client_id"] for d in round2["dropped"]}
        assert "client-2" in absent, round2
        assert round2["server"]["loss"] != _rounds(run_dir)[1]["server"]["loss"]  # aggregated, not skipped

        # The server is killed mid-run and resumed from the last finished round; all three clients rejoin.
        procs.kill(server)
        assert len(_rounds(run_dir)) == 3  # rounds 0, 1, 2
        resumed = procs.fedpriv("resumed", *server_args, "--resume", str(run_dir))
        assert resumed.wait(timeout=400) == 0, procs.output("resumed")[-3000:]
        assert "round 3/3" in procs.output("resumed")

        rounds = _rounds(run_dir)
        assert [r["round"] for r in rounds] == [0, 1, 2, 3]
        assert sorted(e["client_id"] for e in rounds[1]["train"]) == ["client-0", "client-1", "client-2"]
        assert sorted(e["client_id"] for e in rounds[3]["train"]) == ["client-0", "client-1", "client-2"]
        assert all(r["server"]["accuracy"] > 0 for r in rounds)
        for name in ("config.toml", "metrics.csv", "model.pt", "privacy.json", "report.md", "report.html"):
            assert (run_dir / name).is_file(), name

        # Every client's ledger holds each release once, covers every update the server used, and is what the
        # server's privacy record says (the same rounds, the same composed epsilon). A round the killed server
        # had sent out is a release too: clients that trained it carry it under that run's id, and again under
        # the resumed run's.
        privacy = {c["client_id"]: c for c in json.loads((run_dir / "privacy.json").read_text())
                   ["sample_level"]["clients"]}
        ledgers = {}
        for i in range(3):
            cid = f"client-{i}"
            entries = json.loads((tmp_path / f"state-{i}" / f"ledger-{cid}.json").read_text())["entries"]
            releases = [(e["run"], e["round"]) for e in entries]
            assert len(set(releases)) == len(releases), releases
            used = {r["round"] for r in rounds if any(t["client_id"] == cid for t in r["train"])}
            assert used <= {e["round"] for e in entries}, (cid, used, releases)
            assert privacy[cid]["rounds"] == [e["round"] for e in entries]
            assert privacy[cid]["epsilon"] == pytest.approx(entries[-1]["epsilon_after"])
            ledgers[cid] = entries
        # The crashed client's ledger survived its restart: round 1 from before the crash is still there, and
        # round 3, trained after the restart in the resumed run, was composed on top of it, not afresh.
        crashed = ledgers["client-2"]
        assert crashed[0]["round"] == 1 and crashed[-1]["round"] == 3
        assert crashed[-1]["run"] != crashed[0]["run"]
        assert crashed[-1]["epsilon_after"] > crashed[0]["epsilon_after"] > 0
    finally:
        procs.stop_all()
    time.sleep(1.0)  # Flower's children notice a dead parent within 0.2 s
    assert _our_processes(str(tmp_path)) == []


def test_a_failed_run_says_flowers_reason_not_a_retry_notice(tmp_path: Path) -> None:
    """A run Flower failed for a missing heartbeat: the message gives Flower's status details and a hint, and
    the log's connection-retry notices (which say "failed") are not taken for the error."""
    from server.deploy import last_error, run_failure, run_status

    log = tmp_path / "serverapp.log"
    log.write_text("INFO :      Start `flwr-serverapp` process\n"
                   "ERROR :     round 2: secagg stage collect timed out\n"
                   "WARNING :   Connection attempt failed, retrying in 0.03 seconds\n")
    assert last_error(log) == "ERROR :     round 2: secagg stage collect timed out"

    class Cli:
        def __init__(self, run: dict) -> None:
            self.run = run

        def json(self, *args: str) -> dict:
            return {"runs": [self.run]}

    failed = run_status(Cli({"status": "finished:failed", "status-details": "No heartbeat received from the task"}),
                        "1")
    assert failed == "finished:failed (No heartbeat received from the task)"
    assert run_status(Cli({"status": "finished:completed", "status-details": "done"}), "1") == "finished:completed"
    message = run_failure(failed, log)
    assert message.startswith("run ended finished:failed (No heartbeat received from the task): ERROR")
    assert "went quiet for a minute" in message and str(log) in message and "\n" not in message
