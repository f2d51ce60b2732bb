"""The persisted privacy history of one data owner (a client): one entry per round it trained.

The ledger is the single source of truth for what a client has spent. It survives restarts (a JSON file
written atomically) and Flower's per-message ClientApp rebuilds (a JSON string in context.state). It never
resets silently: an unreadable file or someone else's file is an error the operator has to resolve.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from privacy.accounting import PrivacyError, Step, compute_epsilon
from privacy.files import write_atomic

LEDGER_FORMAT = "fedpriv-privacy-ledger"
LEDGER_VERSION = 1
_ENTRY_KEYS = ("round", "noise_multiplier", "sample_rate", "steps", "epsilon_after")


@dataclass
class PrivacyLedger:
    """Per-owner DP history. `entries` hold dicts {round, noise_multiplier, sample_rate, steps,
    epsilon_after}, plus {sampling, population} for fixed-size sampling steps."""

    owner: str
    entries: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not isinstance(self.owner, str) or not self.owner:
            raise PrivacyError(f"ledger owner={self.owner!r} is not allowed: it must be a non-empty string; "
                               "pass the client's stable id")
        checked: list[dict[str, Any]] = []
        seen: set[tuple[str, int]] = set()
        for i, entry in enumerate(self.entries):
            clean = _check_entry(entry, f"entries[{i}]")
            if _key(clean) in seen:
                raise PrivacyError(f"ledger of {self.owner!r} records round {clean['round']} of run "
                                   f"{clean.get('run', '')!r} twice; each round of a run may be recorded once")
            seen.add(_key(clean))
            checked.append(clean)
        self.entries = checked

    def rounds(self) -> list[int]:
        """Round numbers recorded so far, in recording order."""
        return [e["round"] for e in self.entries]

    def record(self, round: int, step: Step, epsilon_after: float, run: str = "") -> bool:
        """Append the step of `round` of `run`. Returns False and changes nothing if that (run, round) is
        already recorded, so a replayed message is never counted twice. The same round number in another run
        (a second study on the same data, or a resumed server's new Flower run) is a new release and counts."""
        if not isinstance(step, Step):
            raise PrivacyError(f"step={step!r} is not a Step; pass Step(noise_multiplier, sample_rate, "
                               "steps)")
        entry: dict[str, Any] = {"round": round, "noise_multiplier": step.noise_multiplier,
                                 "sample_rate": step.sample_rate, "steps": step.steps,
                                 "epsilon_after": epsilon_after}
        if step.sampling != "poisson":
            entry["sampling"] = step.sampling
            entry["population"] = step.population
        if run:
            entry["run"] = str(run)
        clean = _check_entry(entry, "record()")
        if _key(clean) in {_key(e) for e in self.entries}:
            return False
        self.entries.append(clean)
        return True

    def history(self) -> list[Step]:
        """The whole DP history as Steps, one per recorded round."""
        return [_entry_step(e) for e in self.entries]

    def epsilon(self, delta: float, accountant: str = "rdp") -> float:
        """Epsilon composed over every recorded round."""
        return compute_epsilon(self.history(), delta, accountant)

    def to_json(self) -> str:
        """Compact JSON; fits a Flower ConfigRecord string value (context.state)."""
        return json.dumps({"format": LEDGER_FORMAT, "version": LEDGER_VERSION, "owner": self.owner,
                           "entries": self.entries}, allow_nan=False, separators=(",", ":"))

    @classmethod
    def from_json(cls, s: str) -> PrivacyLedger:
        """Parse `to_json` output; malformed input raises PrivacyError."""
        try:
            data = json.loads(s)
        except (TypeError, ValueError) as exc:
            raise PrivacyError(f"privacy ledger text is not valid JSON ({_one_line(exc)}); "
                               "pass the string written by PrivacyLedger.to_json") from None
        if not isinstance(data, dict) or data.get("format") != LEDGER_FORMAT:
            raise PrivacyError(f"privacy ledger text lacks \"format\": \"{LEDGER_FORMAT}\"; "
                               "pass the string written by PrivacyLedger.to_json")
        if data.get("version") != LEDGER_VERSION:
            raise PrivacyError(f"privacy ledger version {data.get('version')!r} is not supported (this "
                               f"fedpriv reads version {LEDGER_VERSION}); use the fedpriv that wrote it")
        entries = data.get("entries")
        if not isinstance(entries, list):
            raise PrivacyError("privacy ledger \"entries\" must be a list; pass the string written by "
                               "PrivacyLedger.to_json")
        return cls(owner=data.get("owner"), entries=entries)  # type: ignore[arg-type]

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write atomically (owner-only), so a crash mid-write leaves the previous ledger intact."""
        write_atomic(path, self.to_json(), private=True)

    @classmethod
    def load(cls, path: str | os.PathLike[str], owner: str) -> PrivacyLedger:
        """The ledger at `path`, or an empty one for `owner` if no file exists yet. A corrupt file, or one
        that belongs to another owner, raises PrivacyError: starting over would forget privacy spent."""
        target = Path(path)
        if not target.exists():
            return cls(owner=owner)
        try:
            text = target.read_text(encoding="utf-8")
            ledger = cls.from_json(text)
        except (OSError, UnicodeDecodeError, PrivacyError) as exc:
            raise PrivacyError(f"privacy ledger {target} is unreadable ({_one_line(exc)}); restore it from a "
                               "backup, or move it aside only if you accept forgetting the privacy it "
                               "records") from None
        if ledger.owner != owner:
            raise PrivacyError(f"privacy ledger {target} belongs to owner {ledger.owner!r}, not {owner!r}; "
                               "give each client its own ledger file")
        return ledger


def _check_entry(entry: Any, where: str) -> dict[str, Any]:
    if not isinstance(entry, dict):
        raise PrivacyError(f"ledger {where} must be a dict with keys {_ENTRY_KEYS}, got {entry!r}")
    missing = [k for k in _ENTRY_KEYS if k not in entry]
    if missing:
        raise PrivacyError(f"ledger {where} lacks keys {missing}; every entry needs {_ENTRY_KEYS}")
    rnd = entry["round"]
    if isinstance(rnd, bool) or not isinstance(rnd, int) or rnd < 0:
        raise PrivacyError(f"ledger {where} round={rnd!r} is not allowed: it must be an integer >= 0")
    eps = entry["epsilon_after"]
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not (eps >= 0 and math.isfinite(eps)):
        raise PrivacyError(f"ledger {where} epsilon_after={eps!r} is not allowed: it must be a finite "
                           "number >= 0")
    step = _entry_step(entry)  # validates the mechanism itself
    clean: dict[str, Any] = {"round": rnd, "noise_multiplier": step.noise_multiplier,
                             "sample_rate": step.sample_rate, "steps": step.steps,
                             "epsilon_after": float(eps)}
    if step.sampling != "poisson":
        clean["sampling"] = step.sampling
        clean["population"] = step.population
    if entry.get("run"):
        clean["run"] = str(entry["run"])
    return clean


def _key(entry: dict[str, Any]) -> tuple[str, int]:
    return (str(entry.get("run", "")), int(entry["round"]))


def _entry_step(entry: dict[str, Any]) -> Step:
    return Step(entry["noise_multiplier"], entry["sample_rate"], entry["steps"],
                entry.get("sampling", "poisson"), entry.get("population"))


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())
