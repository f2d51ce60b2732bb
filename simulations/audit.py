"""`fedpriv audit RUN_DIR`: re-run a DP run's recorded config with canaries and check the accountant's epsilon.

The recorded config.toml is run again, with `audit-canaries` canaries, into RUN_DIR/audit/ (the run folder's
own records are only read). The scores the server saw (canaries.json) give an empirical epsilon lower bound
(privacy/audit.py); RUN_DIR/audit.json records it beside the accountant's epsilon with a verdict, and the
run's privacy report gains an "Empirical audit" section (privacy/audit_report.py).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from privacy import DPConfig, PrivacyError, read_privacy_record
from privacy.audit_report import AUDIT_FILE, AUDIT_SCHEMA_VERSION
from privacy.files import write_atomic
from simulations.runconfig import resolve

AUDIT_DIR = "audit"
DEFAULT_CANARIES = 1000


def _recorded_config(run_dir: Path) -> dict[str, Any]:
    from common import ConfigError

    path = run_dir / "config.toml"
    if not path.is_file():
        raise ConfigError(f"no config.toml in '{run_dir}': pass the folder a fedpriv run wrote its records into")
    try:
        return resolve(path, {})
    except ConfigError as exc:
        raise ConfigError(f"{path} cannot be re-run ({exc}); restore the run's config.toml") from None


def accountant_epsilon(privacy: dict[str, Any], level: str, host: str) -> float:
    """The largest epsilon the accountant reported for the audited unit: the host client (sample level), a
    client's participation in DP-FedAvg (user level), a client's updates over all rounds (local DP)."""
    if level == "sample":
        clients = (privacy.get("sample_level") or {}).get("clients") or []
        eps = [float(c["epsilon"]) for c in clients if str(c["client_id"]) == host]
        if not eps:
            raise PrivacyError(f"the audit's privacy.json records no epsilon for host client {host!r}; the host "
                               "took part in no round: audit with --set audit-host=<a client id that trains>")
        return max(eps)
    if level == "local":
        return float((privacy.get("local") or {}).get("epsilon_composed", math.nan))
    return float((privacy.get("user_level") or {}).get("epsilon", math.nan))


def check_audit_inputs(run_dir: Path, canaries: int, confidence: float) -> tuple[dict[str, Any], DPConfig]:
    """Every bad input is a one-line error here, before anything runs or is written."""
    if not run_dir.is_dir():
        raise PrivacyError(f"run folder '{run_dir}' does not exist; pass the folder of a DP run")
    if not 0.0 < confidence < 1.0:
        raise PrivacyError(f"--confidence {confidence} is not in (0, 1); use e.g. 0.95")
    config = _recorded_config(run_dir)
    dp = check_audit_dp(config, canaries, confidence)
    read_privacy_record(run_dir / "privacy.json")  # missing or corrupt: a one-line PrivacyError
    return config, dp


def check_audit_dp(config: dict[str, Any], canaries: int, confidence: float) -> DPConfig:
    """Whether a run config has a mechanism this audit can measure with these canaries."""
    # Imported here, not at the top: building the `fedpriv` parser imports this module, and privacy.audit's
    # scipy.stats would add about half a second to every command's start-up.
    from privacy.audit import vacuity_problem

    if not 0.0 < confidence < 1.0:
        raise PrivacyError(f"--confidence {confidence} is not in (0, 1); use e.g. 0.95")
    dp = DPConfig.from_run_config(config)
    run_dir = config.get("out-dir", "")
    if not dp.modes:
        raise PrivacyError(f"the run in '{run_dir}' used no differential privacy (dp=none): there is nothing to "
                           "audit; run one with e.g. --dp sample --target-epsilon 8, then audit that")
    if "user" in dp.modes and "sample" not in dp.modes and dp.client_sampling != "poisson":
        raise PrivacyError("a user-level audit samples canary clients by Poisson sampling like real ones; audit "
                           "a run with client-sampling=poisson")
    if problem := vacuity_problem(canaries, dp.delta, confidence):
        raise PrivacyError(problem)
    return dp


def run_audit(run_dir: str | Path, *, canaries: int = DEFAULT_CANARIES, confidence: float = 0.95, seed: int = 0,
              engine: str = "inprocess") -> dict[str, Any]:
    """Audit the run in run_dir; writes run_dir/audit.json and rebuilds the report; returns the record."""
    from privacy.audit import audit_stats
    from simulations.simulate import simulate

    run_dir = Path(run_dir).resolve()
    config, dp = check_audit_inputs(run_dir, canaries, confidence)
    # Flower logs every clipped update at INFO: with hundreds of canary clients that is most of a round's time.
    logging.getLogger("flwr").setLevel(logging.WARNING)
    level = "sample" if "sample" in dp.modes else "user" if "user" in dp.modes else "local"
    audit_dir = run_dir / AUDIT_DIR
    if audit_dir.exists():
        shutil.rmtree(audit_dir)  # an earlier audit's outputs only
    audit_config = {**config, "audit-canaries": canaries, "audit-seed": seed, "out-dir": str(audit_dir),
                    "resume-from": ""}
    started = time.perf_counter()
    simulate(audit_config, engine)
    seconds = time.perf_counter() - started

    scores_record = json.loads((audit_dir / "canaries.json").read_text())
    scores, included = np.array(scores_record["scores"]), np.array(scores_record["included"], dtype=bool)
    privacy = read_privacy_record(audit_dir / "privacy.json")
    eps = accountant_epsilon(privacy, level, dp.audit_host)
    # Local DP's guarantee over R rounds is (R*epsilon, R*delta) (basic composition): the bound is taken at the
    # delta of the guarantee it is compared with.
    delta = float(privacy["local"]["delta_composed"]) if level == "local" else dp.delta
    stats = audit_stats(scores, included, delta, confidence)
    record = {
        "schema_version": AUDIT_SCHEMA_VERSION,
        "level": level,
        "canaries": stats.canaries,
        "guesses": stats.guesses,
        "guesses_top": stats.guesses_top,
        "correct": stats.correct,
        "delta": stats.delta,
        "confidence": stats.confidence,
        "epsilon_lower_bound": stats.epsilon_lower_bound,
        "epsilon_estimate": stats.epsilon_estimate if math.isfinite(stats.epsilon_estimate) else None,
        "auroc": stats.auroc,
        "tpr_at_1pct_fpr": stats.tpr_at_1pct_fpr,
        "accountant_epsilon": eps,
        "verdict": "consistent" if stats.epsilon_lower_bound <= eps else "VIOLATION",
        "best_possible_bound": stats.best_possible_bound,
        "seed": seed,
        "host": scores_record["host"],
        "rounds_observed": scores_record["rounds"],
        "grad_sample_mode": scores_record.get("grad_sample_mode"),
        "engine": engine,
        "seconds": seconds,
        "audit_dir": AUDIT_DIR,
        "scores_included": scores[included].tolist(),
        "scores_excluded": scores[~included].tolist(),
    }
    write_atomic(run_dir / AUDIT_FILE, json.dumps(record, indent=1, allow_nan=False) + "\n")
    from privacy.report import render_reports

    render_reports(run_dir)
    return record


def summary_line(record: dict[str, Any]) -> str:
    estimate = record["epsilon_estimate"]
    estimate = "infinite" if estimate is None else f"{estimate:.3g}"
    return (f"{record['level']}-level audit, {record['canaries']} canaries: epsilon lower bound "
            f"{record['epsilon_lower_bound']:.3g} at {record['confidence']:.0%} confidence vs accountant epsilon "
            f"{record['accountant_epsilon']:.3g}: {record['verdict']}  (point estimate, not a bound: {estimate}; "
            f"AUROC {record['auroc']:.3f})")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "audit", help="measure an empirical epsilon lower bound of a DP run with canaries",
        description="Re-run RUN_DIR's recorded config with canaries into RUN_DIR/audit/, write RUN_DIR/audit.json "
                    "(the bound, the accountant's epsilon, the verdict) and rebuild the privacy report.")
    p.add_argument("run_dir", metavar="RUN_DIR", help="output folder of a DP run")
    add_audit_flags(p)
    p.add_argument("--engine", choices=("inprocess", "ray"), default="inprocess")
    p.set_defaults(func=_run)


def add_audit_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--canaries", type=int, default=DEFAULT_CANARIES, metavar="M", help="number of canaries m")
    p.add_argument("--confidence", type=float, default=0.95, help="confidence of the lower bound, in (0, 1)")
    p.add_argument("--seed", dest="audit_seed", type=int, default=0, metavar="S",
                   help="seed of the canaries (which are included, where they sit, when they are sampled)")


def _run(args: argparse.Namespace) -> int:
    logging.getLogger("flwr").setLevel(logging.WARNING)
    record = run_audit(args.run_dir, canaries=args.canaries, confidence=args.confidence, seed=args.audit_seed,
                       engine=args.engine)
    print(summary_line(record))
    print(f"audit record: {Path(args.run_dir) / AUDIT_FILE}; report: {Path(args.run_dir) / 'report.html'}")
    return 0 if record["verdict"] == "consistent" else 1
