"""The data owner runs only the code it trusts: a server that ships a modified ClientApp is refused.

The bundle check on its own (Flower's FAB builder over the app `fedpriv server` stages), then a real
deployment on loopback whose server runs from a copy of fedpriv with a ClientApp that ignores the budget:
both clients, by default, refuse every message of that run with one line, the server records who refused
and why, the run ends without them, and nothing was trained or spent.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

import pytest
from flwr.cli.build import build_fab_from_disk
from test_deploy import FLOWER, ROOT, Processes, _free_port, _our_processes, _rounds, _wait

from client.split import split_dataset
from client.trust import TrustedApp, check_bundle
from server.deploy import APP_PACKAGES, stage_app
from simulations.runconfig import default_run_config

# The modification: the client's budget guard waved through (a server wanting more than the owner allows).
BUDGET_CHECK = "        if not plan.allowed:"
IGNORE_BUDGET = "        if False:  # budget ignored"


def _modified_copy(where: Path) -> Path:
    for name in (*APP_PACKAGES, "simulations"):  # the server's commands, too
        shutil.copytree(ROOT / name, where / name, ignore=shutil.ignore_patterns("__pycache__"))
    app = where / "client" / "app.py"
    source = app.read_text()
    assert BUDGET_CHECK in source
    app.write_text(source.replace(BUDGET_CHECK, IGNORE_BUDGET))
    return where


def test_the_bundle_check_accepts_the_installed_app_and_nothing_else(tmp_path: Path) -> None:
    trusted = TrustedApp.installed()
    app = stage_app(default_run_config(), tmp_path / "app")
    assert check_bundle(build_fab_from_disk(app), trusted) is None

    client_app = app / "client" / "app.py"
    client_app.write_text(client_app.read_text().replace(BUDGET_CHECK, IGNORE_BUDGET))
    reason = check_bundle(build_fab_from_disk(app), trusted)
    assert reason is not None and "client/app.py" in reason and "differs" in reason

    # The same code under another ClientApp reference, or another version, is not the trusted app either.
    stage_app(default_run_config(), tmp_path / "app")
    pyproject = app / "pyproject.toml"
    pyproject.write_text(pyproject.read_text().replace('"client.app:app"', '"client.evil:app"'))
    assert "client.evil:app" in check_bundle(build_fab_from_disk(app), trusted)
    pyproject.write_text(pyproject.read_text().replace(f'version = "{trusted.version}"', 'version = "9.9.9"'))
    assert "9.9.9" in check_bundle(build_fab_from_disk(app), trusted)
    assert check_bundle(b"not a zip", trusted) == "the app bundle is not a readable FAB"


@pytest.mark.skipif(not FLOWER.exists(), reason="flower-superlink is not installed next to this python")
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses /proc and process groups")
def test_a_modified_clientapp_is_refused_by_default(tmp_path: Path) -> None:
    evil = _modified_copy(tmp_path / "evil")
    files = split_dataset("digits", 2, "iid", tmp_path / "data", seed=7)
    run_dir, logs = tmp_path / "run", tmp_path / "logs"
    logs.mkdir()
    address = f"127.0.0.1:{_free_port()}"
    procs = Processes(logs)
    try:
        server = procs.fedpriv("server", "server", "--insecure", "--address", address, "--dataset", "digits",
                               "--model", "mlp", "--rounds", "1", "--min-clients", "2", "--round-timeout", "60",
                               "--start-timeout", "120", "--out", str(run_dir), "--set", "dp=sample",
                               "--set", "noise-multiplier=1.0", "--set", "budget-epsilon=0.01",
                               env={"PYTHONPATH": str(evil)}, cwd=evil)
        clients = [procs.fedpriv(f"client-{i}", "client", "--superlink", address, "--insecure",
                                 "--data", str(files[i].path), "--state-dir", str(tmp_path / f"state-{i}"),
                                 "--threads", "1") for i in range(2)]
        assert server.wait(timeout=240) == 0, procs.output("server")[-3000:]
        _wait("the clients' refusals", lambda: all("REFUSED" in procs.output(f"client-{i}") for i in range(2)),
              20, clients, procs)
    finally:
        procs.stop_all()

    (round1,) = [r for r in _rounds(run_dir) if r["round"] == 1]
    assert round1["train"] == [] and round1["evaluate"] == []
    refused = {e["client_id"]: e["reason"] for e in round1["refused"]}
    assert set(refused) == {"client-0", "client-1"}
    assert all("untrusted app" in r and "client/app.py" in r for r in refused.values()), refused
    # One line each side: the server names who refused and why; each client says which app and what it runs.
    server_out = procs.output("server")
    assert "refused client-0: untrusted app" in server_out and "refused client-1: untrusted app" in server_out
    for i in range(2):
        lines = [ln for ln in procs.output(f"client-{i}").splitlines() if "REFUSED" in ln]
        assert len(lines) == 1, lines  # said once, though every message of the run was refused
        assert "client/app.py" in lines[0] and TrustedApp.installed().describe() in lines[0]
        assert "Traceback" not in procs.output(f"client-{i}")
        # Nothing ran on the data: no privacy was spent, so no ledger was written.
        assert not list((tmp_path / f"state-{i}").glob("ledger-*.json"))
    assert json.loads((run_dir / "metrics.json").read_text())["rounds"][0]["round"] == 0
    time.sleep(1.0)
    assert _our_processes(str(tmp_path)) == []
