"""Devices (`device = auto | cpu | cuda[:N]`) and the Ray engine's cluster flags: what works here (CPU), and
the one-line errors for a device or a cluster that is not there. The two-node Ray cluster test starts its own
head and worker on loopback and stops every process it started by PID (never `ray stop`, which would stop
every Ray on the machine)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

import pytest
import torch

from common import ConfigError, TrainConfig
from common.devices import client_device, resolve_device
from simulations.cli import main

NO_CUDA = not torch.cuda.is_available()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_device_names() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("AUTO").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ConfigError, match="'gpu' is not a device; use one of auto"):
        resolve_device("gpu")
    with pytest.raises(ConfigError, match="not a device"):
        TrainConfig.from_run_config({"device": "cuda:x"})
    # A deployed client's own --device (node config) wins over the run's.
    assert client_device({"device": "cuda:7"}, {"device": "cpu"}) == torch.device("cpu")


@pytest.mark.skipif(not NO_CUDA, reason="checks the error on a machine without CUDA")
def test_cuda_where_there_is_none_is_one_line_before_training(tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ConfigError, match="no usable CUDA GPU"):
        resolve_device("cuda:0")
    out = tmp_path / "run"
    assert main(["simulate", "--dataset", "digits", "--model", "logreg", "--device", "cuda", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "device = 'cuda', but this machine has no usable CUDA GPU" in err[0]
    assert not (out / "metrics.json").exists()
    data = tmp_path / "own.npz"
    import numpy as np

    np.savez(data, x=np.zeros((4, 1, 8, 8), dtype=np.float32), y=np.arange(4))
    assert main(["client", "--superlink", "127.0.0.1:9", "--insecure", "--data", str(data), "--state-dir",
                 str(tmp_path / "s"), "--device", "cuda:1"]) == 2
    assert "--device = 'cuda:1', but this machine has no usable CUDA GPU" in capsys.readouterr().err


@pytest.mark.parametrize("mode", ["auto", "hooks"])  # book-keeping, and Opacus' own path
def test_auto_trains_where_it_can_and_is_recorded(tmp_path: Path, mode: str) -> None:
    out = tmp_path / "run"
    assert main(["simulate", "--dataset", "digits", "--model", "logreg", "--num-clients", "2", "--rounds", "1",
                 "--device", "auto", "--set", "dp=sample", "--set", "noise-multiplier=1.0",
                 "--set", f"grad-sample-mode={mode}", "--out", str(out)]) == 0
    assert tomllib.loads((out / "config.toml").read_text())["device"] == "auto"
    # DP-SGD ran on the resolved device: a client that fails there is dropped and the run goes on, so look at
    # the replies (on CUDA, a noise generator left on the host once failed every client this way).
    last = json.loads((out / "metrics.json").read_text())["rounds"][-1]
    assert not last.get("dropped"), last.get("dropped")
    assert len(last["train"]) == 2 and (out / "privacy.json").is_file()


def test_ray_flags_fail_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    base = ["simulate", "--dataset", "digits", "--model", "logreg", "--engine", "ray", "--out", str(tmp_path / "r")]
    port = _closed_port()
    assert main([*base, "--ray-address", f"127.0.0.1:{port}"]) == 2
    assert f"--ray-address 127.0.0.1:{port}: nothing answers" in capsys.readouterr().err
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))  # no ray/ray_current_cluster there
    assert main([*base, "--ray-address", "auto"]) == 2
    assert "--ray-address auto: no Ray cluster was started on this machine" in capsys.readouterr().err
    assert main([*base, "--gpus-per-client", "0.5"]) == 2
    assert "add --device cuda" in capsys.readouterr().err
    assert main(["simulate", "--dataset", "digits", "--ray-address", "auto"]) == 2
    assert "add --engine ray" in capsys.readouterr().err


DEFAULT_ADDRESS_FILE = Path("/tmp/ray/ray_current_cluster")


def _read(path: Path) -> str | None:
    return path.read_text() if path.is_file() else None


def _ray_processes(marker: str) -> list[int]:
    """PIDs of live processes whose environment carries this test's marker: everything `ray start` started
    (GCS, raylets, workers, agents) inherits it."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            if (entry / "stat").read_text().split(") ")[-1].startswith("Z"):
                continue
            if marker.encode() in (entry / "environ").read_bytes():
                found.append(int(entry.name))
    return found


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds Ray's processes through /proc")
def test_a_simulation_on_a_two_node_ray_cluster(tmp_path: Path) -> None:
    ray = Path(sys.executable).parent / "ray"
    marker = f"fedpriv-ray-test-{tmp_path.name}-{os.getpid()}"
    # A Ray temp folder of the test's own (short: Ray's socket paths have a length limit): `ray start` writes
    # the cluster's address into TMP/ray/ray_current_cluster, and a plain ray.init() anywhere on the machine
    # would try to join the (soon dead) cluster named in the default /tmp/ray one.
    ray_tmp = Path(tempfile.mkdtemp(prefix="fpray-", dir="/tmp"))
    before = _read(DEFAULT_ADDRESS_FILE)
    env = {**os.environ, "FEDPRIV_TEST_MARK": marker, "RAY_USAGE_STATS_ENABLED": "0", "RAY_TMPDIR": str(ray_tmp),
           "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    port = _closed_port()
    address = f"127.0.0.1:{port}"
    out = tmp_path / "run"
    try:
        for cmd in ([str(ray), "start", "--head", "--port", str(port), "--node-ip-address", "127.0.0.1",
                     "--num-cpus", "1", "--include-dashboard", "false", "--disable-usage-stats"],
                    [str(ray), "start", "--address", address, "--node-ip-address", "127.0.0.1", "--num-cpus", "1",
                     "--disable-usage-stats"]):
            done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
            assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
        sim = subprocess.run([sys.executable, "-m", "simulations.cli", "simulate", "--engine", "ray",
                              "--ray-address", address, "--cpus-per-client", "1", "--dataset", "digits",
                              "--model", "logreg", "--num-clients", "2", "--rounds", "1", "--out", str(out)],
                             env=env, capture_output=True, text=True, timeout=300)
        assert sim.returncode == 0, sim.stderr[-3000:]
        import json

        rounds = json.loads((out / "metrics.json").read_text())["rounds"]
        assert len(rounds[1]["train"]) == 2  # both clients trained, on the cluster's actors
        assert rounds[1]["server"]["accuracy"] > 0.5
    finally:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in _ray_processes(marker):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            time.sleep(2.0)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert _ray_processes(marker) == []
    # The machine's own Ray address file is as it was: other Ray users are not pointed at a dead cluster.
    assert _read(DEFAULT_ADDRESS_FILE) == before
