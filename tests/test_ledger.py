"""Ledger persistence, the budget guard, and the privacy.json record."""

from __future__ import annotations

import copy
import json

import pytest

from privacy import (
    SCHEMA_VERSION,
    Budget,
    PrivacyError,
    PrivacyLedger,
    Step,
    check_budget,
    compute_epsilon,
    library_versions,
    read_privacy_record,
    write_privacy_record,
)

DELTA = 1e-5
ROUND = Step(1.0, 0.008, 125)


def _ledger(rounds: int, owner: str = "client-3") -> PrivacyLedger:
    ledger = PrivacyLedger(owner)
    for r in range(1, rounds + 1):
        ledger.record(r, ROUND, compute_epsilon([ROUND] * r, DELTA))
    return ledger


# --- ledger ----------------------------------------------------------------------------------------------

def test_record_composes_over_all_rounds_and_never_double_counts():
    ledger = _ledger(3)
    before = ledger.epsilon(DELTA)
    assert before == pytest.approx(compute_epsilon([ROUND] * 3, DELTA))
    assert ledger.record(2, Step(0.5, 0.1, 999), 123.0) is False  # replayed round 2
    assert ledger.rounds() == [1, 2, 3] and ledger.history() == [ROUND] * 3
    assert ledger.epsilon(DELTA) == before
    assert ledger.record(4, ROUND, 2.0) is True
    assert ledger.epsilon(DELTA) > before
    assert ledger.entries[-1] == {"round": 4, "noise_multiplier": 1.0, "sample_rate": 0.008, "steps": 125,
                                  "epsilon_after": 2.0}


def test_save_load_round_trip_and_restart_resumes_epsilon(tmp_path):
    path = tmp_path / "state" / "nested" / "client-3.json"  # parent folders do not exist yet
    _ledger(5).save(path)
    assert [p.name for p in path.parent.iterdir()] == ["client-3.json"]  # no temp file left behind

    restarted = PrivacyLedger.load(path, "client-3")  # a new process after a crash
    assert restarted == _ledger(5)
    restarted.record(6, ROUND, 0.0)
    restarted.save(path)
    again = PrivacyLedger.load(path, "client-3")
    assert again.epsilon(DELTA) == pytest.approx(compute_epsilon([ROUND] * 6, DELTA))
    assert again.rounds() == [1, 2, 3, 4, 5, 6]


def test_missing_file_starts_an_empty_ledger(tmp_path):
    ledger = PrivacyLedger.load(tmp_path / "nope.json", "client-0")
    assert ledger.owner == "client-0" and ledger.entries == [] and ledger.epsilon(DELTA) == 0.0


@pytest.mark.parametrize("text", ["{not json", json.dumps({"format": "other", "entries": []}),
                                  json.dumps({"format": "fedpriv-privacy-ledger", "version": 1,
                                              "owner": "client-3", "entries": [{"round": 1}]})])
def test_corrupt_file_is_an_error_naming_the_file_and_is_left_alone(tmp_path, text):
    path = tmp_path / "client-3.json"
    path.write_text(text)
    with pytest.raises(PrivacyError) as exc:
        PrivacyLedger.load(path, "client-3")
    msg = str(exc.value)
    assert str(path) in msg and "restore it from a backup" in msg and "\n" not in msg
    assert path.read_text() == text  # never silently reset


def test_another_owners_file_is_refused(tmp_path):
    path = tmp_path / "ledger.json"
    _ledger(2, owner="client-7").save(path)
    with pytest.raises(PrivacyError, match=r"belongs to owner 'client-7', not 'client-3'.*its own ledger"):
        PrivacyLedger.load(path, "client-3")


def test_json_round_trip_for_context_state_keeps_fixed_sampling():
    ledger = _ledger(2)
    ledger2 = PrivacyLedger("server")
    ledger2.record(1, Step(1.0, 0.1, 1, "fixed", 50), 1.5)
    for original in (ledger, ledger2):
        text = original.to_json()
        assert isinstance(text, str)
        assert PrivacyLedger.from_json(text) == original
    assert PrivacyLedger.from_json(ledger2.to_json()).history() == [Step(1.0, 0.1, 1, "fixed", 50)]
    with pytest.raises(PrivacyError, match="not valid JSON"):
        PrivacyLedger.from_json("")


def test_ledger_rejects_bad_entries():
    with pytest.raises(PrivacyError, match="round 1 of run '' twice"):
        PrivacyLedger("a", [{"round": 1, "noise_multiplier": 1.0, "sample_rate": 0.1, "steps": 1,
                             "epsilon_after": 0.1}] * 2)
    with pytest.raises(PrivacyError, match="round=-1"):
        PrivacyLedger("a").record(-1, ROUND, 0.1)
    with pytest.raises(PrivacyError, match="epsilon_after=nan"):
        PrivacyLedger("a").record(1, ROUND, float("nan"))
    with pytest.raises(PrivacyError, match="owner=''"):
        PrivacyLedger("")


# --- budget guard -----------------------------------------------------------------------------------------

def test_check_budget_allows_then_refuses_without_touching_the_ledger():
    ledger = _ledger(2)
    budget = Budget(epsilon=1.6, delta=DELTA)  # 6 rounds spend ~1.56, 7 rounds ~1.64
    ok = check_budget(ledger, ROUND, budget)
    assert ok.allowed and ok.epsilon_now == pytest.approx(ledger.epsilon(DELTA))
    assert ok.epsilon_after == pytest.approx(compute_epsilon([ROUND] * 3, DELTA)) and ok.epsilon_after <= 1.6
    assert ok.reason.startswith("allowed")

    ledger = _ledger(6)
    entries = copy.deepcopy(ledger.entries)
    no = check_budget(ledger, ROUND, budget)
    assert not no.allowed and no.epsilon_now <= 1.6 < no.epsilon_after
    assert no.reason.startswith("refused") and "budget epsilon=1.6" in no.reason
    assert ledger.entries == entries


def test_budget_uses_its_own_delta():
    ledger = _ledger(3)
    loose, strict = (check_budget(ledger, ROUND, Budget(10.0, d)) for d in (1e-3, 1e-8))
    assert loose.epsilon_after < strict.epsilon_after


@pytest.mark.parametrize(("eps", "delta", "match"), [(0.0, 1e-5, "epsilon=0.0"), (-1, 1e-5, "epsilon=-1"),
                                                     (1.0, 0.0, "delta=0.0"), (1.0, 1.0, "delta=1.0")])
def test_budget_validation(eps, delta, match):
    with pytest.raises(PrivacyError, match=match):
        Budget(eps, delta)


# --- privacy.json -------------------------------------------------------------------------------------------

def _record() -> dict:
    return {
        "schema_version": SCHEMA_VERSION,
        "delta": DELTA,
        "sample_level": {"accountant": "rdp", "clients": [{
            "client_id": 3, "num_examples": 1000, "noise_multiplier": 1.0, "max_grad_norm": 1.0,
            "sample_rate": 0.008, "steps_per_round": [125, 125], "epsilon_per_round": [1.12, 1.5],
            "rounds": [1, 3], "epsilon": 1.5, "budget": {"epsilon": 8.0, "delta": DELTA},
            "refused_rounds": []}]},
        "user_level": {"accountant": "rdp", "noise_multiplier": 1.0, "clipping_norm": 0.5,
                       "client_sampling": "poisson", "client_sampling_rate": 0.5, "num_clients": 10,
                       "epsilon_per_round": [2.1, 2.9], "epsilon": 2.9, "epsilon_pld": 2.5,
                       "clipping": "fixed"},
        "local": None,
        "library_versions": library_versions(),
    }


def test_privacy_record_round_trip(tmp_path):
    path = tmp_path / "out" / "privacy.json"
    write_privacy_record(path, _record())
    assert read_privacy_record(path) == _record()
    assert json.loads(path.read_text())["schema_version"] == 1


def test_library_versions_name_the_libraries():
    versions = library_versions()
    assert set(versions) == {"torch", "opacus", "flwr", "dp-accounting", "numpy", "python"}
    assert versions["dp-accounting"][0].isdigit() and versions["python"].startswith("3.")


def _broken(path: str, value) -> dict:
    record = _record()
    *parents, last = path.split(".")
    node = record
    for key in parents:
        node = node[key][0] if key == "clients" else node[key]
    if value is KeyError:
        del node[last]
    else:
        node[last] = value
    return record


@pytest.mark.parametrize(("path", "value", "match"), [
    ("delta", KeyError, r"missing keys \['delta'\]"),
    ("extra", 1, r"unknown keys \['extra'\]"),
    ("schema_version", 2, "schema_version=2"),
    ("delta", 2.0, r"'delta' is 2\.0.*\(0, 1\)"),
    ("sample_level.accountant", "moments", "'sample_level.accountant'"),
    ("sample_level.clients.epsilon", "1.5", r"'sample_level.clients\[0\].epsilon'"),
    ("sample_level.clients.rounds", [1], "equal lengths"),
    ("sample_level.clients.refused_rounds", [1.5], r"refused_rounds\[0\]"),
    ("sample_level.clients.budget", {"epsilon": 8.0}, r"budget has missing keys \['delta'\]"),
    ("user_level.client_sampling", "stratified", "'user_level.client_sampling'"),
    ("user_level.epsilon_pld", float("inf"), "'user_level.epsilon_pld'"),
    ("user_level.clipping", "none", "'user_level.clipping'"),
    ("local", [], "'local'"),
])
def test_privacy_record_schema_errors_name_the_key(tmp_path, path, value, match):
    with pytest.raises(PrivacyError, match=match):
        write_privacy_record(tmp_path / "privacy.json", _broken(path, value))
    assert not (tmp_path / "privacy.json").exists()


def test_reading_a_bad_privacy_record_names_the_file(tmp_path):
    with pytest.raises(PrivacyError, match="does not exist"):
        read_privacy_record(tmp_path / "privacy.json")
    bad = tmp_path / "privacy.json"
    bad.write_text(json.dumps({**_record(), "user_level": {"accountant": "rdp"}}))
    with pytest.raises(PrivacyError, match=rf"privacy record {bad}: user_level has missing keys"):
        read_privacy_record(bad)
    bad.write_text("{")
    with pytest.raises(PrivacyError, match="not readable JSON"):
        read_privacy_record(bad)


def test_write_atomic_keeps_the_old_file_on_failure_and_sets_permissions(tmp_path, monkeypatch):
    import os
    import stat

    from privacy.files import write_atomic

    ledger, report = tmp_path / "deep" / "ledger.json", tmp_path / "report.md"
    write_atomic(ledger, "old", private=True)
    write_atomic(report, b"page")
    assert stat.S_IMODE(ledger.stat().st_mode) == 0o600
    assert stat.S_IMODE(report.stat().st_mode) == 0o666 & ~_umask()

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        write_atomic(ledger, "new", private=True)
    assert ledger.read_text() == "old"
    assert sorted(p.name for p in ledger.parent.iterdir()) == ["ledger.json"]  # no temp file left


def _umask() -> int:
    import os

    current = os.umask(0)
    os.umask(current)
    return current
