"""SecAgg+ with distributed DP in a real deployment: `fedpriv server` (TLS + SuperNode authentication) and five
`fedpriv client`s on loopback, `--dp user --secagg`, one client killed while it trains in round 2. The round
still releases the exact masked sum of the survivors, and the records say who was lost and what it cost.

Every process is started as the leader of its own process group and stopped by PID in `finally`.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest
from test_deploy import FLOWER, Processes, _free_port, _kill_client, _our_processes, _rounds, _wait

from client.split import split_dataset
from privacy.records import validate_privacy_record
from server.certs import create_certs

pytestmark = [pytest.mark.skipif(not FLOWER.exists(), reason="flower-superlink is not installed next to this python"),
              pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses /proc and process groups")]

CLIENTS = 5


def test_secagg_distributed_dp_deployment_survives_a_client_killed_mid_round(tmp_path: Path) -> None:
    certs = create_certs(tmp_path / "certs", ["localhost", "127.0.0.1"], clients=CLIENTS)
    files = split_dataset("digits", CLIENTS, "iid", tmp_path / "data", seed=3)
    run_dir, logs = tmp_path / "run", tmp_path / "logs"
    logs.mkdir()
    address = f"127.0.0.1:{_free_port()}"
    procs = Processes(logs)
    try:
        server = procs.fedpriv(
            "server", "server", "--certs", str(certs.root), "--address", address, "--round-timeout", "20",
            "--start-clients", str(CLIENTS), "--start-timeout", "150", "--dataset", "digits", "--model", "mlp",
            "--rounds", "2", "--min-clients", "3", "--out", str(run_dir), "--seed", "3",
            "--set", "secagg=true", "--set", "secagg-threshold=3", "--set", "dp=user",
            "--set", "client-sampling=fixed", "--set", "user-noise-multiplier=0.7",
            "--set", "user-clipping-norm=1.0", "--set", "fraction-evaluate=0")
        clients = [procs.fedpriv(f"client-{i}", "client", "--superlink", address, "--certs", str(certs.root),
                                 "--data", str(files[i].path), "--state-dir", str(tmp_path / f"state-{i}"),
                                 "--threads", "1", "--dataset", "digits") for i in range(CLIENTS)]
        _wait("round 1", lambda: len(_rounds(run_dir)) >= 2, 240, [server, *clients], procs)
        # Round 2: client-4 is killed once its share message has arrived. Whether it dies before answering it
        # (excluded before anyone masks with it) or after (its masks are removed using the others' shares),
        # the round must release the exact sum of the other four.
        _wait("client-4's second share message",
              lambda: procs.output("client-4").count("query.secagg_share message") >= 2, 120,
              [server, *clients], procs, poll=0.05)
        _kill_client(procs, clients[4], tmp_path / "state-4")
        assert server.wait(timeout=300) == 0, procs.output("server")[-3000:]

        rounds = _rounds(run_dir)
        assert [r["round"] for r in rounds] == [0, 1, 2]
        r1, r2 = rounds[1]["secagg"], rounds[2]["secagg"]
        assert r1["survivors"] == [f"client-{i}" for i in range(CLIENTS)] and r1["dropped"] == []
        assert r2["survivors"] == [f"client-{i}" for i in range(4)], r2
        assert [d["client_id"] for d in r2["dropped"]] == ["client-4"]
        stage = r2["dropped"][0]["stage"]
        assert stage in ("share", "collect"), r2
        assert r2["unmasked_from_shares"] == (["client-4"] if stage == "collect" else []), r2
        assert r2["codec"] == "skellam"
        assert rounds[2]["server"]["accuracy"] > 0 and rounds[2]["server"]["loss"] != rounds[1]["server"]["loss"]

        privacy = json.loads((run_dir / "privacy.json").read_text())
        validate_privacy_record(privacy)
        section = privacy["secure_aggregation"]
        assert section["survivors_per_round"] == [5, 4] and section["threshold"] == 3
        ddp = section["distributed_dp"]
        assert ddp["epsilon"] == privacy["user_level"]["epsilon"] > 0 and len(ddp["epsilon_per_round"]) == 2
        for name in ("config.toml", "metrics.csv", "model.pt", "report.md", "report.html"):
            assert (run_dir / name).is_file(), name
        assert "client-4" in (run_dir / "report.md").read_text()
    finally:
        procs.stop_all()
    time.sleep(1.0)
    assert _our_processes(str(tmp_path)) == []
