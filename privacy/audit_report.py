"""The privacy report's "Empirical audit" section, built from RUN_DIR/audit.json alone (fedpriv audit writes it).

Like the rest of the report it shows what was recorded and recomputes nothing.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from privacy.documents import Block, Bullets, Figure, Heading, Para, Table, new_axes, png_bytes

AUDIT_FILE = "audit.json"
AUDIT_SCHEMA_VERSION = 1
FIG_AUDIT = "report_audit_scores.png"
LEVEL_WORDS = {"sample": "one training example of the host client (sample level)",
               "user": "one client's whole participation (user level)",
               "local": "one client's update under local DP"}
_REQUIRED = ("schema_version", "level", "canaries", "guesses", "correct", "delta", "confidence",
             "epsilon_lower_bound", "epsilon_estimate", "auroc", "tpr_at_1pct_fpr", "accountant_epsilon", "verdict")


def read_audit(run_dir: Path, error: type[Exception]) -> dict[str, Any] | None:
    """audit.json parsed and checked, None when absent; a bad file raises `error` with a one-line message."""
    path = run_dir / AUDIT_FILE
    if not path.is_file():
        return None
    fix = "re-run `fedpriv audit RUN_DIR` to rewrite it, or delete it"
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise error(f"{path} is not readable JSON ({' '.join(str(exc).split())}); {fix}") from None
    if not isinstance(record, dict):
        raise error(f"{path} is not a JSON object; {fix}")
    missing = [k for k in _REQUIRED if k not in record]
    if missing:
        raise error(f"{path} lacks '{missing[0]}'; {fix}")
    if record["schema_version"] != AUDIT_SCHEMA_VERSION:
        raise error(f"{path} has schema_version {record['schema_version']!r}, expected {AUDIT_SCHEMA_VERSION}; {fix}")
    if record["verdict"] not in ("consistent", "VIOLATION") or record["level"] not in LEVEL_WORDS:
        raise error(f"{path} has verdict {record['verdict']!r} / level {record['level']!r}; {fix}")
    for key in ("epsilon_lower_bound", "accountant_epsilon", "auroc", "delta", "confidence"):
        if not isinstance(record[key], int | float) or isinstance(record[key], bool):
            raise error(f"{path}: {key} = {record[key]!r} is not a number; {fix}")
    return record


def _plot_scores(included: list[float], excluded: list[float]) -> bytes:
    fig, ax = new_axes("Canary scores (what the server saw)", "score", "canaries")
    values = included + excluded
    bins = 30 if values else 1
    lo, hi = (min(values), max(values)) if values else (0.0, 1.0)
    if lo == hi:
        lo, hi = lo - 0.5, hi + 0.5
    ax.hist(excluded, bins=bins, range=(lo, hi), alpha=0.55, label=f"not included ({len(excluded)})")
    ax.hist(included, bins=bins, range=(lo, hi), alpha=0.55, label=f"included ({len(included)})")
    ax.legend(fontsize=8)
    return png_bytes(fig)


def _f(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return f"{value:.{digits}g}" if isinstance(value, float) else str(value)


def audit_warning(record: dict[str, Any]) -> str | None:
    """The report's loud warning line on a violation."""
    if record["verdict"] != "VIOLATION":
        return None
    return (f"AUDIT VIOLATION: the empirical lower bound epsilon >= {_f(record['epsilon_lower_bound'])} "
            f"(at {record['confidence']:.0%} confidence) exceeds the accountant's epsilon "
            f"{_f(record['accountant_epsilon'])}: the run did not implement the recorded mechanism (noise, "
            "clipping or sampling differ from what was accounted). Do not rely on this run's privacy claim.")


def audit_section(record: dict[str, Any]) -> list[Block]:
    bound, eps = record["epsilon_lower_bound"], record["accountant_epsilon"]
    unit = LEVEL_WORDS[record["level"]]
    blocks: list[Block] = [Heading(2, "Empirical audit")]
    if (warning := audit_warning(record)) is not None:
        blocks.append(Bullets((warning,), warning=True))
    verdict = ("consistent: the measured lower bound does not exceed the accountant's epsilon"
               if record["verdict"] == "consistent" else "VIOLATION")
    blocks += [
        Para(f"The run's recorded config was trained again with {record['canaries']} canaries, each included "
             f"with probability 1/2, passing through the same sampling, clipping and noise as the real data; "
             f"the protected unit is {unit}. From what the server saw, an attack guessed which canaries were "
             f"included: {record['correct']} of its {record['guesses']} guesses were right. At "
             f"{record['confidence']:.0%} confidence this proves epsilon >= {_f(bound)} (delta "
             f"{record['delta']:g}); the accountant's epsilon is {_f(eps)}. Verdict: {verdict}."),
        Table(("Quantity", "Value"), (
            ("Empirical epsilon lower bound (Steinke et al. 2023, one run)", _f(bound)),
            ("Accountant epsilon (audited unit)", _f(eps)),
            ("Largest bound these canaries could show", _f(record.get("best_possible_bound"))),
            ("Estimate, NOT a bound: two fitted Gaussians (Andrew et al. 2024)", _f(record["epsilon_estimate"])),
            ("Attack AUROC", _f(record["auroc"])),
            ("Attack TPR at 1% FPR", _f(record["tpr_at_1pct_fpr"])),
            ("Canaries m / guesses r / correct v", f"{record['canaries']} / {record['guesses']} / {record['correct']}"),
            ("Audit seed, host", f"{record.get('seed', 'n/a')}, {record.get('host', 'n/a')}"),
        )),
        Bullets((
            "What a lower bound means: whatever the accountant says, the run leaked at least this much about a "
            "canary, with the stated confidence. A bound above the accountant's epsilon means the mechanism "
            "that ran is not the one that was accounted for.",
            "What it cannot show: a bound below the accountant's epsilon does not prove the privacy claim. "
            "One-run audits with a realistic attack are loose (often far below the true epsilon); a "
            "consistent verdict only rules out gross errors such as noise mis-scaled by a large factor or "
            "clipping skipped.",
            "The two-Gaussian figure is an estimate that assumes Gaussian scores; it is not a guarantee in "
            "either direction.",
        )),
    ]
    included, excluded = record.get("scores_included"), record.get("scores_excluded")
    if isinstance(included, list) and isinstance(excluded, list):
        blocks.append(Figure(FIG_AUDIT, "Canary scores: included canaries (signal) against canaries not included "
                                        "(null); the more they overlap, the less the server learnt.",
                             _plot_scores([float(x) for x in included], [float(x) for x in excluded])))
    return blocks
