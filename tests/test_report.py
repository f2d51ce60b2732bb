"""Tests for privacy/report.py: reports built from privacy.json + metrics.json fixtures alone."""

from __future__ import annotations

import argparse
import base64
import copy
import json
import re
from pathlib import Path
from typing import Any

import pytest

from privacy.report import ReportError, fmt_delta, fmt_epsilon, register, render_reports

VERSIONS = {"python": "3.11.7", "torch": "2.13.0", "opacus": "1.6.0", "flwr": "1.41.0",
            "dp-accounting": "0.6.0", "numpy": "2.4.6"}


def _client(cid: str, n: int, z: float, rounds: list[int], eps: list[float], budget: float | None = None,
            refused: list[int] | None = None) -> dict[str, Any]:
    return {"client_id": cid, "num_examples": n, "noise_multiplier": z, "max_grad_norm": 1.0,
            "sample_rate": 0.0133, "rounds": rounds, "steps_per_round": [75] * len(rounds),
            "epsilon_per_round": eps, "epsilon": eps[-1],
            "budget": None if budget is None else {"epsilon": budget, "delta": 1e-5},
            "refused_rounds": refused or []}


SAMPLE = {"accountant": "rdp", "clients": [
    # Client 3 stops at its budget: round 5 was refused by its budget guard.
    _client("3", 4800, 0.9, [1, 2, 4], [0.8, 1.2, 1.5], budget=1.6, refused=[5]),
    _client("5", 3000, 0.5, [1, 2, 3, 4, 5], [3.1, 5.9, 8.2, 10.4, 12.345]),
    _client("7", 5200, 1.1, [1, 2, 3, 4, 5], [0.7, 1.1, 1.4, 1.7, 2.0001], budget=3.0),
]}
USER = {"accountant": "rdp", "noise_multiplier": 1.0, "clipping_norm": 1.0, "clipping": "fixed",
        "client_sampling": "poisson", "client_sampling_rate": 0.5, "num_clients": 10,
        "epsilon_per_round": [2.0, 3.1, 4.2, 5.0, 5.7, 6.2, 6.6, 6.9, 7.0, 7.1], "epsilon": 7.1,
        "epsilon_pld": 6.9}
LOCAL = {"epsilon_per_round": 1.0, "rounds": 5, "epsilon_composed": 5.0, "sensitivity": 1.0,
         "note": "Laplace noise on each update"}


def _metrics(num_rounds: int) -> dict[str, Any]:
    rounds = []
    for r in range(num_rounds + 1):
        entry: dict[str, Any] = {"round": r, "server": {"loss": 1.0 - 0.1 * r, "accuracy": 0.5 + 0.07 * r}}
        if r:
            trained = ("3", "5", "7") if r in (1, 2, 4) else ("5", "7")  # as SAMPLE's rounds say
            entry["train"] = [{"client_id": c, "metrics": {"loss": 0.5, "accuracy": 0.8, "num-examples": 10}}
                              for c in trained]
            entry["dropped"] = [{"client_id": "9", "reason": "timeout"}] if r == 2 else []
            refused = [{"client_id": "3", "reason": "budget 1.6 would be exceeded"}]
            entry["refused"] = refused if r == 5 else []
        rounds.append(entry)
    return {"rounds": rounds}


def _write_run(tmp_path: Path, *, sample: Any = None, user: Any = None, local: Any = None,
               delta: float = 1e-5, metrics: Any = "default", name: str = "run") -> Path:
    run = tmp_path / name
    run.mkdir()
    privacy = {"schema_version": 1, "delta": delta, "sample_level": sample, "user_level": user,
               "local": local, "library_versions": VERSIONS}
    (run / "privacy.json").write_text(json.dumps(privacy), encoding="utf-8")
    if metrics is not None:
        payload = _metrics(5) if metrics == "default" else metrics
        (run / "metrics.json").write_text(json.dumps(payload), encoding="utf-8")
    (run / "config.toml").write_text('[dp]\nlevel = "sample"\ndelta = 1e-5\n', encoding="utf-8")
    return run


def _row(md: str, first_cell: str, columns: int) -> str:
    """The one Markdown table row that starts with first_cell and has `columns` cells."""
    rows = [line for line in md.splitlines()
            if line.startswith(f"| {first_cell} |") and len(re.split(r"(?<!\\)\|", line)) == columns + 2]
    assert len(rows) == 1, rows
    return rows[0]


def _images(page: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)]


def test_formatting_rounds_epsilon_up_and_shortens_delta() -> None:
    assert fmt_epsilon(1.5) == "1.50"
    assert fmt_epsilon(0.8) == "0.80"  # 0.8 * 100 is 80.00000000000001 in floats: must not become 0.81
    assert fmt_epsilon(2.0001) == "2.01"
    assert fmt_epsilon(12.345) == "12.35"
    assert fmt_epsilon(float("inf")) == "infinite"
    assert fmt_epsilon(None) == "not recorded"
    assert fmt_delta(1e-5) == "1e-5"
    assert fmt_delta(2.5e-06) == "2.5e-6"


def test_sample_level_report(tmp_path: Path) -> None:
    run = _write_run(tmp_path, sample=SAMPLE)
    md_path, html_path = render_reports(run)
    assert (md_path, html_path) == (run.resolve() / "report.md", run.resolve() / "report.html")
    md, page = md_path.read_text(encoding="utf-8"), html_path.read_text(encoding="utf-8")

    # Plain words: unit, relation, sampling, delta, accountant + library version, composition.
    assert "Privacy unit: one example on one client" in md
    assert "add/remove one example" in md
    assert "Poisson sampling of examples" in md
    assert "delta = 1e-5" in md
    assert "Rényi differential privacy (RDP) accountant, computed with dp-accounting 0.6.0" in md
    assert "composed over all rounds" in md
    assert "Hyperparameter choices made on private data spend privacy too" in md
    assert "every client's data got at most epsilon = 12.35 at delta = 1e-5 (sample level)" in md
    assert "Final server accuracy: 0.8500 (round 5)" in md

    # Per-client table: examples, z, clip, q, rounds, total steps, final epsilon, budget, refused rounds.
    assert _row(md, "3", 10) == ("| 3 | 4800 | 0.9 | 1 | 0.0133 | 3 (1-2, 4) | 225 | 1.50 "
                                 "| epsilon 1.6 at delta 1e-5 | 5 |")
    assert "| 12.35 | none | none |" in _row(md, "5", 10)
    assert "| 375 | 2.01 | epsilon 3 at delta 1e-5 | none |" in _row(md, "7", 10)
    # Rounds table from metrics.json: refusal and drop with their reasons.
    assert _row(md, "5", 6) == "| 5 | 0.85 | 0.5 | 2 (5, 7) | 3 (budget 1.6 would be exceeded) | none |"
    assert _row(md, "2", 6).endswith("| none | 9 (timeout) |")

    # Exactly one weak-guarantee warning, for client 5 (12.35 > 10); none for 1.50 or 2.01.
    for text in (md, page):
        assert text.count("weak guarantee") == 1
    assert "weak guarantee: client 5 has final epsilon = 12.35" in md
    assert ("refused round: client 3's budget guard refused round 5 (reason recorded: budget 1.6 would be "
            "exceeded)") in md
    assert "BUDGET EXCEEDED" not in md and "above 1/n" not in md

    # How to check: histories and the fedpriv budget command for client 3's first round.
    assert "75 steps in each of rounds 1-2, 4" in md
    assert ("fedpriv budget --noise-multiplier 0.9 --sample-rate 0.0133 --steps 75 --delta 1e-05 "
            "--accountant rdp") in md
    assert "acc.compose(step, 225)" in md

    # Figures: PNG files for md, embedded base64 PNGs for a self-contained html.
    for name in ("report_epsilon.png", "report_accuracy.png"):
        assert f"]({name})" in md
        assert (run / name).read_bytes().startswith(b"\x89PNG")
    images = _images(page)
    assert len(images) >= 2 and all(img.startswith(b"\x89PNG") for img in images)
    assert 'src="http' not in page and "<script" not in page and "<link" not in page
    assert 'level = "sample"' in md  # config.toml verbatim


def test_user_level_report(tmp_path: Path) -> None:
    run = _write_run(tmp_path, user=USER, metrics=None)
    md = render_reports(run)[0].read_text(encoding="utf-8")
    assert "Privacy unit: all the data of one client" in md
    assert "add/remove one client" in md
    assert "Poisson sampling of clients" in md and "probability q = 0.5" in md
    assert "computed with dp-accounting 0.6.0" in md
    assert _row(md, "1e-5", 3) == "| 1e-5 | 7.10 | 6.90 |"  # RDP and PLD side by side
    assert "at most epsilon = 7.10 at delta = 1e-5 (RDP accountant; the PLD accountant gives 6.90)" in md
    assert "weak guarantee" not in md and "1/num_clients = " not in md
    assert "No server accuracy was recorded" in md
    assert "report_user_epsilon.png" in md and "report_accuracy.png" not in md
    assert "Sample-level guarantee" not in md


def test_fixed_client_sampling_and_prv_accountant(tmp_path: Path) -> None:
    sample = {"accountant": "prv", "clients": [_client("3", 4800, 0.9, [1], [0.8])]}
    user = dict(USER, client_sampling="fixed", epsilon_pld=None)
    md = render_reports(_write_run(tmp_path, sample=sample, user=user))[0].read_text(encoding="utf-8")
    assert "privacy random variable (PRV) accountant, computed with opacus 1.6.0" in md
    assert "Neighbouring relation: replace one client" in md and "noise multiplier z / 2" in md
    assert "fixed-size sampling of clients" in md
    assert _row(md, "1e-5", 3) == "| 1e-5 | 7.10 | not computed |"
    assert "--accountant prv" in md
    # No single-command check for fixed-size client sampling: only the sample-level example is given.
    assert md.count("fedpriv budget --") == 1


def test_both_levels_and_local(tmp_path: Path) -> None:
    run = _write_run(tmp_path, sample=SAMPLE, user=USER, local=LOCAL)
    md_path, html_path = render_reports(run)
    md, page = md_path.read_text(encoding="utf-8"), html_path.read_text(encoding="utf-8")
    assert "one example on one client" in md and "all the data of one client" in md
    assert "(sample level)" in md
    assert "User level: all the data of any one client got at most epsilon = 7.10" in md
    assert ("local DP: each round's update is 1.00-DP on its own, but the same client data is used in all 5 "
            "rounds, so over the whole run the guarantee is epsilon = 5.00 (composed)") in md
    assert md.count("weak guarantee") == 1
    assert len(_images(page)) == 3
    # Same content in both documents: every warning line of the md appears in the html.
    warnings = [line.removeprefix("- **WARNING** ") for line in md.splitlines() if "**WARNING**" in line]
    assert len(warnings) == 3  # weak client 5, refused round, local composition
    for w in warnings:
        assert w.replace("\\", "").replace("'", "&#x27;") in page


def test_budget_exceeded_and_delta_warnings(tmp_path: Path) -> None:
    sample = {"accountant": "rdp", "clients": [
        _client("a", 4800, 0.9, [1, 2], [2.5, 3.2], budget=3.0),
        _client("big", 200_000, 1.0, [1], [0.4]),
    ]}
    user = dict(USER, num_clients=200_000)
    md = render_reports(_write_run(tmp_path, sample=sample, user=user))[0].read_text(encoding="utf-8")
    warnings = [line for line in md.splitlines() if "**WARNING**" in line]
    assert warnings[0].startswith("- **WARNING** BUDGET EXCEEDED: client a reached epsilon = 3.20, above its "
                                  "budget epsilon = 3. This should never happen")
    assert "1 client(s) EXCEEDED their privacy budget" in md
    assert "delta = 1e-5 is above 1/n = 1/200000 for client big" in md
    assert "1/n = 1/4800" not in md
    assert "delta = 1e-5 is above 1/num_clients = 1/200000 at user level" in md


def test_record_values_are_escaped(tmp_path: Path) -> None:
    sample = {"accountant": "rdp", "clients": [_client("<b>x</b>|y", 100, 1.0, [1], [0.5])]}
    md_path, html_path = render_reports(_write_run(tmp_path, sample=sample, metrics=None))
    md, page = md_path.read_text(encoding="utf-8"), html_path.read_text(encoding="utf-8")
    assert "<b>" not in page and "&lt;b&gt;x&lt;/b&gt;|y" in page
    assert "<b>" not in md and r"\<b\>x\</b\>\|y" in md


def test_rendering_is_deterministic(tmp_path: Path) -> None:
    run = _write_run(tmp_path, sample=SAMPLE)
    first = [p.read_bytes() for p in render_reports(run)]
    assert [p.read_bytes() for p in render_reports(run)] == first


def _cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="fedpriv")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_report_subcommand_rebuilds_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = _write_run(tmp_path, sample=SAMPLE, user=USER)
    md_path, html_path = render_reports(run)
    expected = md_path.read_text(encoding="utf-8")
    md_path.unlink()
    html_path.unlink()
    (run / "report_epsilon.png").unlink()
    capsys.readouterr()
    assert _cli(["report", str(run)]) == 0
    out = capsys.readouterr()
    assert out.out.splitlines() == [str(md_path), str(html_path)] and out.err == ""
    assert md_path.read_text(encoding="utf-8") == expected
    assert html_path.is_file() and (run / "report_epsilon.png").is_file()


def _corrupt(run: Path) -> None:
    (run / "privacy.json").write_text('{"schema_version": 1, "delta": ', encoding="utf-8")


def _drop_privacy(run: Path) -> None:
    (run / "privacy.json").unlink()


def _bad_epsilon(run: Path) -> None:
    privacy = {"schema_version": 1, "delta": 1e-5, "sample_level": copy.deepcopy(SAMPLE)}
    privacy["sample_level"]["clients"][1]["epsilon"] = "high"
    (run / "privacy.json").write_text(json.dumps(privacy), encoding="utf-8")


def _future_schema(run: Path) -> None:
    (run / "privacy.json").write_text('{"schema_version": 2, "delta": 1e-5}', encoding="utf-8")


def _corrupt_metrics(run: Path) -> None:
    (run / "metrics.json").write_text("[1, 2", encoding="utf-8")


@pytest.mark.parametrize(("spoil", "expected"), [
    (None, "run folder '{run}/missing' does not exist"),
    (_corrupt, "privacy.json in '{run}' is not valid JSON: Expecting value at line 1 column 32"),
    (_drop_privacy, "no privacy.json in '{run}'"),
    (_bad_epsilon, "privacy.json.sample_level.clients[1].epsilon is 'high'; expected a number"),
    (_future_schema, "privacy.json has schema_version 2; this fedpriv reads schema_version 1"),
    (_corrupt_metrics, "metrics.json in '{run}' is not valid JSON"),
])
def test_report_subcommand_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str], spoil: Any,
                                  expected: str) -> None:
    run = _write_run(tmp_path, sample=SAMPLE).resolve()
    target = run / "missing" if spoil is None else run
    if spoil is not None:
        spoil(run)
    assert _cli(["report", str(target)]) == 2
    out = capsys.readouterr()
    assert out.out == ""
    lines = out.err.splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("fedpriv report: error: " + expected.format(run=run))
    assert re.search(r"\([^()]+\)$", lines[0])  # ends with "(<fix>)"
    assert not (run / "report.md").exists()
    with pytest.raises(ReportError):
        render_reports(target)
