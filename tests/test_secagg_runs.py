"""SecAgg end to end on the in-process engine: plain SecAgg, distributed DP with clients lost mid-round, records."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import client.secagg as client_secagg
from common.secagg_crypto import SecAggError
from privacy.records import validate_privacy_record
from simulations.cli import main

SMALL = ["--dataset", "digits", "--model", "mlp", "--num-clients", "4", "--rounds", "2", "--local-epochs", "2"]


def rounds_of(out: Path) -> list[dict]:
    return json.loads((out / "metrics.json").read_text())["rounds"]


def test_secagg_alone_matches_plain_fedavg(tmp_path):
    secure, plain = tmp_path / "secure", tmp_path / "plain"
    assert main(["simulate", *SMALL, "--secagg", "--out", str(secure)]) == 0
    assert main(["simulate", *SMALL, "--out", str(plain)]) == 0
    s, p = rounds_of(secure), rounds_of(plain)
    assert all(r["secagg"]["released"] and r["secagg"]["survivors"] == ["0", "1", "2", "3"] for r in s[1:])
    assert all(r["secagg"]["stage_reached"] == "released" and r["secagg"]["codec"] == "plain" for r in s[1:])
    # Uniform mean of quantized updates against FedAvg weighted by (nearly equal) example counts.
    assert abs(s[-1]["server"]["accuracy"] - p[-1]["server"]["accuracy"]) < 0.05
    assert s[-1]["server"]["accuracy"] > s[0]["server"]["accuracy"] + 0.2  # it learned
    assert sorted(e["client_id"] for e in s[-1]["train"]) == ["0", "1", "2", "3"]
    assert all("arrays" not in e and "masked" not in json.dumps(e) for e in s[-1]["train"])


def test_distributed_dp_with_clients_lost_mid_protocol(tmp_path, monkeypatch):
    """Node of client 1 dies at collect in round 1 (after its shares went out: unmasked from shares); the node
    of client 3 dies at share in round 2 (before: excluded before anyone masks with it)."""
    real = client_secagg.respond

    def flaky(stage, request, state, encode=None):
        me = state.get("me") if stage != "setup" else int(request["me"])
        if (stage, int(request["round"]), me) in {("collect", 1, 3), ("share", 2, 5)}:
            raise SecAggError("node lost")
        return real(stage, request, state, encode)

    monkeypatch.setattr(client_secagg, "respond", flaky)
    out = tmp_path / "ddp"
    flags = ["--num-clients", "5", "--secagg", "--secagg-threshold", "3", "--dp", "user", "--client-sampling",
             "fixed", "--user-noise-multiplier", "0.7", "--user-clipping-norm", "1.0"]
    assert main(["simulate", *SMALL, *flags, "--out", str(out)]) == 0
    r1, r2 = (r["secagg"] for r in rounds_of(out)[1:])
    assert r1["survivors"] == ["0", "2", "3", "4"] and r1["unmasked_from_shares"] == ["1"]
    assert [(d["client_id"], d["stage"]) for d in r1["dropped"]] == [("1", "collect")]
    assert r2["survivors"] == ["0", "1", "2", "4"] and r2["unmasked_from_shares"] == []
    assert [(d["client_id"], d["stage"]) for d in r2["dropped"]] == [("3", "share")]
    assert r1["codec"] == "skellam" and r1["edge_fraction"] < 0.01
    privacy = json.loads((out / "privacy.json").read_text())
    validate_privacy_record(privacy)
    section = privacy["secure_aggregation"]
    assert section["survivors_per_round"] == [4, 4] and section["threshold"] == 3
    assert "honest-but-curious" in section["trust_model"] and "no amplification" in section["trust_model"]
    ddp = section["distributed_dp"]
    assert ddp["epsilon"] == privacy["user_level"]["epsilon"] > 0 and len(ddp["epsilon_per_round"]) == 2
    assert ddp["inflation"] < 1.01
    assert (out / "report.md").exists()


def test_round_below_threshold_releases_nothing(tmp_path, monkeypatch):
    real = client_secagg.respond

    def lossy(stage, request, state, encode=None):
        if stage == "collect" and state.get("me") in (2, 3):
            raise SecAggError("node lost")
        return real(stage, request, state, encode)

    monkeypatch.setattr(client_secagg, "respond", lossy)
    out = tmp_path / "lost"
    assert main(["simulate", *SMALL, "--rounds", "1", "--secagg", "--secagg-threshold", "3", "--out", str(out)]) == 0
    first, last = rounds_of(out)
    assert last["secagg"]["released"] is False and "fewer than the threshold 3" in last["secagg"]["refused"]
    assert last["server"]["accuracy"] == first["server"]["accuracy"]  # the model did not move


@pytest.mark.parametrize(("flags", "fragment"), [
    (["--secagg", "--secagg-threshold", "5"], "secagg-threshold = 5 is above the 4 share holders"),
    (["--secagg", "--secagg-threshold", "1"], "secagg-threshold = 1 is below 2"),
    (["--secagg", "--dp", "user", "--secagg-bits", "8"], "raise secagg-bits"),
    (["--secagg", "--strategy", "fedprox"], "use --strategy fedavg"),
    (["--secagg", "--dp", "local"], "with secagg use dp=user"),
])
def test_bad_secagg_settings_are_one_line_before_training(tmp_path, capsys, flags, fragment):
    out = tmp_path / "bad"
    assert main(["simulate", *SMALL, "--out", str(out), *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert fragment in err and len(err.splitlines()) == 1 and "Traceback" not in err
    assert not (out / "metrics.json").exists()
