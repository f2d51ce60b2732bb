"""Process plumbing for the Flower executables a deployment starts (SuperNode, SuperLink, `flwr`): find them,
give them an environment, start each as a process group that dies with its parent, and stop the whole group.

Used by `fedpriv client` (client/deploy.py) and, from the layer above, `fedpriv server` (server/deploy.py).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

from common.config import ConfigError

__all__ = ["die_with_parent", "flower_bin", "flower_env", "start_group", "stop_group"]


def flower_bin(name: str) -> str:
    """A Flower executable of this environment: next to this Python first, so an un-activated venv works."""
    here = Path(sys.executable).parent / name
    found = str(here) if here.exists() else shutil.which(name)
    if found is None:
        raise ConfigError(f"{name} was not found next to {sys.executable} or on PATH; install flwr "
                          "(pip install 'flwr[simulation]==1.41.0') in this environment")
    return found


def flower_env(flwr_home: Path, threads: int | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.update({
        "FLWR_HOME": str(flwr_home),
        # Without it a SuperNode or SuperLink would `uv sync` the app's dependencies for every run (offline: fails).
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "PYTHONUNBUFFERED": "1",
        # Flower starts flower-superexec, flwr-clientapp and flwr-serverapp by name: they must be found even
        # without an activated venv.
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
    })
    if threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    return env


def die_with_parent() -> None:
    """Runs in a child (before exec, or after fork): on Linux the kernel kills it when its parent dies, however
    it dies. A SuperNode left behind would keep a data owner's node online with nobody watching it; a SuperLink
    left behind would hold the port a restarted `fedpriv server --resume` needs."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError):
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def start_group(cmd: list[str], env: Mapping[str, str], log: Path | None = None,
                pipe: bool = False) -> subprocess.Popen:
    """Start cmd as the leader of a new process group, so stopping it stops everything it started. Its output
    goes to a pipe (pipe=True), appended to log, or nowhere."""
    out = subprocess.PIPE if pipe else (open(log, "ab") if log else subprocess.DEVNULL)  # noqa: SIM115
    try:
        return subprocess.Popen(cmd, env=dict(env), stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                preexec_fn=die_with_parent)
    finally:
        if not pipe and log:
            out.close()  # the child holds its own copy


def stop_group(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """SIGTERM to the whole group, SIGKILL to whatever is left after `grace` seconds."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=grace)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # stragglers in the group (Flower's own children)
    proc.wait()
