"""Privacy budget reports (report.md and report.html) built from a run's records alone.

A data-protection officer must be able to check every number in the report against the records the run
wrote (privacy.json, metrics.json, config.toml), so this module reads those files with the json module
only and never recomputes or imports the accounting code: what is shown is what was recorded.
Both documents are rendered from one list of blocks, so the Markdown and the HTML say the same thing.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import re
import sys
from dataclasses import dataclass
from decimal import ROUND_CEILING, Decimal
from pathlib import Path
from typing import Any

from privacy.audit_report import audit_section, audit_warning, read_audit
from privacy.documents import (
    Block,
    Bullets,
    Code,
    Figure,
    FigureRow,
    Heading,
    Para,
    Table,
    new_axes,
    png_bytes,
    write_documents,
)

__all__ = ["ReportError", "register", "render_reports", "run_report"]

SCHEMA_VERSION = 1
WEAK_EPSILON = 10.0
REPORT_MD = "report.md"
REPORT_HTML = "report.html"
FIG_SAMPLE = "report_epsilon.png"
FIG_USER = "report_user_epsilon.png"
FIG_ACCURACY = "report_accuracy.png"

# Which library computes each accountant in privacy/accounting.py (RDP and PLD from Google's dp-accounting,
# PRV from Opacus); a level's optional "library" key in privacy.json overrides this.
_ACCOUNTANT_LIBRARY = {"rdp": "dp-accounting", "pld": "dp-accounting", "prv": "opacus"}
_ACCOUNTANTS = {
    "rdp": "Rényi differential privacy (RDP) accountant",
    "prv": "privacy random variable (PRV) accountant",
    "pld": "privacy loss distribution (PLD) accountant",
    "gdp": "Gaussian differential privacy (GDP) accountant",
}
_FIX_RECORD = "rerun the training to rewrite it, or restore the run folder from a backup"


class ReportError(ValueError):
    """A run folder or one of its records cannot be turned into a report; the message is one line."""


def _fail(what: str, fix: str) -> ReportError:
    return ReportError(f"{what} ({fix})")


# --------------------------------------------------------------------------------------------------
# Records: parsed into small frozen dataclasses with one-line errors that name the bad value.
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClientRecord:
    client_id: str
    num_examples: int | None
    noise_multiplier: float | None
    max_grad_norm: float | None
    sample_rate: float | None
    rounds: tuple[int, ...]
    steps_per_round: tuple[int, ...]
    epsilon_per_round: tuple[float, ...]
    epsilon: float | None
    budget_epsilon: float | None
    budget_delta: float | None
    refused_rounds: tuple[int, ...]


@dataclass(frozen=True)
class SampleLevel:
    accountant: str
    library: str
    clients: tuple[ClientRecord, ...]


@dataclass(frozen=True)
class UserLevel:
    accountant: str
    library: str
    noise_multiplier: float | None
    clipping_norm: float | None
    clipping: str | None
    client_sampling: str | None
    client_sampling_rate: float | None
    num_clients: int | None
    epsilon_per_round: tuple[float, ...]
    epsilon: float | None
    epsilon_pld: float | None


@dataclass(frozen=True)
class LocalLevel:
    epsilon_per_round: float | None
    rounds: int | None
    epsilon_composed: float | None
    sensitivity: float | None
    note: str | None


@dataclass(frozen=True)
class PrivacyRecord:
    delta: float
    sample: SampleLevel | None
    user: UserLevel | None
    local: LocalLevel | None
    library_versions: dict[str, str]


@dataclass(frozen=True)
class RoundMetrics:
    round: int
    accuracy: float | None
    loss: float | None
    trained: tuple[str, ...]
    dropped: tuple[tuple[str, str], ...]
    refused: tuple[tuple[str, str], ...]
    ema_accuracy: float | None = None  # the server's moving average of the global model (ema-decay), if kept


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _bad(where: str, value: Any, expected: str) -> ReportError:
    return _fail(f"{where} is {_short(value)}; expected {expected}", _FIX_RECORD)


def _obj(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _bad(where, value, "an object")
    return value


def _num(d: dict[str, Any], key: str, where: str, *, required: bool = False) -> float | None:
    value = d.get(key)
    if value is None:
        if required:
            raise _fail(f"{where}.{key} is missing", _FIX_RECORD)
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _bad(f"{where}.{key}", value, "a number")
    return float(value)


def _int(d: dict[str, Any], key: str, where: str) -> int | None:
    value = d.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise _bad(f"{where}.{key}", value, "a whole number")
    return value


def _str(d: dict[str, Any], key: str, where: str) -> str | None:
    value = d.get(key)
    if value is None:
        return None
    if not isinstance(value, (str, int)) or isinstance(value, bool):
        raise _bad(f"{where}.{key}", value, "a string")
    return str(value)


def _num_list(d: dict[str, Any], key: str, where: str) -> tuple[float, ...]:
    value = d.get(key)
    if value is None:
        return ()
    if not isinstance(value, list) or any(
            isinstance(v, bool) or not isinstance(v, (int, float)) for v in value):
        raise _bad(f"{where}.{key}", value, "a list of numbers")
    return tuple(float(v) for v in value)


def _int_list(d: dict[str, Any], key: str, where: str) -> tuple[int, ...]:
    value = d.get(key)
    if value is None:
        return ()
    if not isinstance(value, list) or any(isinstance(v, bool) or not isinstance(v, int) for v in value):
        raise _bad(f"{where}.{key}", value, "a list of whole numbers")
    return tuple(value)


def _load_json(path: Path, label: str) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise _fail(f"{label} in '{path.parent}' is not UTF-8 text: {exc.reason}", _FIX_RECORD) from exc
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise _fail(
            f"{label} in '{path.parent}' is not valid JSON: {exc.msg} "
            f"at line {exc.lineno} column {exc.colno}",
            _FIX_RECORD,
        ) from exc


def _library_of(accountant: str) -> str:
    return _ACCOUNTANT_LIBRARY.get(accountant.lower(), "an unrecorded library")


def _parse_client(raw: Any, where: str) -> ClientRecord:
    d = _obj(raw, where)
    client_id = _str(d, "client_id", where)
    if client_id is None:
        raise _fail(f"{where}.client_id is missing", _FIX_RECORD)
    budget = d.get("budget")
    budget_eps = budget_delta = None
    if budget is not None:
        b = _obj(budget, f"{where}.budget")
        budget_eps = _num(b, "epsilon", f"{where}.budget")
        budget_delta = _num(b, "delta", f"{where}.budget")
    return ClientRecord(
        client_id=client_id,
        num_examples=_int(d, "num_examples", where),
        noise_multiplier=_num(d, "noise_multiplier", where),
        max_grad_norm=_num(d, "max_grad_norm", where),
        sample_rate=_num(d, "sample_rate", where),
        rounds=_int_list(d, "rounds", where),
        steps_per_round=_int_list(d, "steps_per_round", where),
        epsilon_per_round=_num_list(d, "epsilon_per_round", where),
        epsilon=_num(d, "epsilon", where),
        budget_epsilon=budget_eps,
        budget_delta=budget_delta,
        refused_rounds=_int_list(d, "refused_rounds", where),
    )


def _parse_privacy(data: Any) -> PrivacyRecord:
    d = _obj(data, "privacy.json")
    version = d.get("schema_version")
    if version != SCHEMA_VERSION:
        raise _fail(
            f"privacy.json has schema_version {_short(version)}; "
            f"this fedpriv reads schema_version {SCHEMA_VERSION}",
            "use the fedpriv version that wrote the run, or rerun the training",
        )
    delta = _num(d, "delta", "privacy.json", required=True)
    assert delta is not None
    if not 0.0 <= delta < 1.0:
        raise _bad("privacy.json.delta", delta, "a number in [0, 1)")
    sample = user = local = None
    if d.get("sample_level") is not None:
        where = "privacy.json.sample_level"
        s = _obj(d["sample_level"], where)
        raw_clients = s.get("clients") or []
        if not isinstance(raw_clients, list):
            raise _bad(f"{where}.clients", raw_clients, "a list of client records")
        accountant = _str(s, "accountant", where) or "rdp"
        sample = SampleLevel(
            accountant=accountant,
            library=_str(s, "library", where) or _library_of(accountant),
            clients=tuple(_parse_client(c, f"{where}.clients[{i}]") for i, c in enumerate(raw_clients)),
        )
    if d.get("user_level") is not None:
        where = "privacy.json.user_level"
        u = _obj(d["user_level"], where)
        accountant = _str(u, "accountant", where) or "rdp"
        user = UserLevel(
            accountant=accountant,
            library=_str(u, "library", where) or _library_of(accountant),
            noise_multiplier=_num(u, "noise_multiplier", where),
            clipping_norm=_num(u, "clipping_norm", where),
            clipping=_str(u, "clipping", where),
            client_sampling=_str(u, "client_sampling", where),
            client_sampling_rate=_num(u, "client_sampling_rate", where),
            num_clients=_int(u, "num_clients", where),
            epsilon_per_round=_num_list(u, "epsilon_per_round", where),
            epsilon=_num(u, "epsilon", where),
            epsilon_pld=_num(u, "epsilon_pld", where),
        )
    if d.get("local") is not None:
        where = "privacy.json.local"
        loc = _obj(d["local"], where)
        local = LocalLevel(
            epsilon_per_round=_num(loc, "epsilon_per_round", where),
            rounds=_int(loc, "rounds", where),
            epsilon_composed=_num(loc, "epsilon_composed", where),
            sensitivity=_num(loc, "sensitivity", where),
            note=_str(loc, "note", where),
        )
    versions = d.get("library_versions") or {}
    if not isinstance(versions, dict):
        raise _bad("privacy.json.library_versions", versions, "an object of library name to version")
    return PrivacyRecord(delta, sample, user, local, {str(k): str(v) for k, v in versions.items()})


def _parse_entries(raw: Any, where: str) -> tuple[tuple[str, str], ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise _bad(where, raw, "a list")
    out = []
    for i, item in enumerate(raw):
        e = _obj(item, f"{where}[{i}]")
        out.append((_str(e, "client_id", f"{where}[{i}]") or "?", _str(e, "reason", f"{where}[{i}]") or ""))
    return tuple(out)


def _parse_metrics(data: Any) -> tuple[RoundMetrics, ...]:
    d = _obj(data, "metrics.json")
    raw_rounds = d.get("rounds") or []
    if not isinstance(raw_rounds, list):
        raise _bad("metrics.json.rounds", raw_rounds, "a list of rounds")
    out = []
    for i, raw in enumerate(raw_rounds):
        where = f"metrics.json.rounds[{i}]"
        r = _obj(raw, where)
        number = _int(r, "round", where)
        if number is None:
            raise _fail(f"{where}.round is missing", _FIX_RECORD)
        server = _obj(r.get("server") or {}, f"{where}.server")
        train = r.get("train") or []
        if not isinstance(train, list):
            raise _bad(f"{where}.train", train, "a list")
        trained = tuple(_str(_obj(t, f"{where}.train[{j}]"), "client_id", f"{where}.train[{j}]") or "?"
                        for j, t in enumerate(train))
        out.append(RoundMetrics(
            round=number,
            accuracy=_num(server, "accuracy", f"{where}.server"),
            loss=_num(server, "loss", f"{where}.server"),
            trained=trained,
            dropped=_parse_entries(r.get("dropped"), f"{where}.dropped"),
            refused=_parse_entries(r.get("refused"), f"{where}.refused"),
            ema_accuracy=_num(server, "ema_accuracy", f"{where}.server"),
        ))
    return tuple(sorted(out, key=lambda m: m.round))


# --------------------------------------------------------------------------------------------------
# Formatting: epsilon is rounded UP so that a displayed "at most" never understates the record.
# --------------------------------------------------------------------------------------------------


def fmt_epsilon(value: float | None) -> str:
    """Epsilon rounded up to two decimals ('not recorded', 'infinite' for the edge cases)."""
    if value is None:
        return "not recorded"
    if math.isnan(value):
        return "not a number"
    if math.isinf(value):
        return "infinite"
    return str(Decimal(repr(value)).quantize(Decimal("0.01"), rounding=ROUND_CEILING))


def fmt_delta(value: float) -> str:
    """Delta in short scientific form: 1e-05 -> '1e-5'."""
    return re.sub(r"e([+-])0*(\d)", r"e\1\2", f"{value:.3g}").replace("e+", "e")


def _g(value: float | None, digits: int = 4) -> str:
    return "not recorded" if value is None else f"{value:.{digits}g}"


def _ranges(values: tuple[int, ...]) -> str:
    """1,2,3,5 -> '1-3, 5': long round lists stay readable."""
    if not values:
        return "none"
    ordered = sorted(set(values))
    parts, start, prev = [], ordered[0], ordered[0]
    for v in ordered[1:] + [None]:  # type: ignore[list-item]
        if v is not None and v == prev + 1:
            prev = v
            continue
        parts.append(str(start) if start == prev else f"{start}-{prev}")
        if v is not None:
            start = prev = v
    return ", ".join(parts)


def _ids(ids: tuple[str, ...] | list[str]) -> str:
    return ", ".join(ids) if ids else "none"


def _library(versions: dict[str, str], name: str) -> str:
    version = versions.get(name)
    return f"{name} {version}" if version else f"{name} (version not recorded)"


def _accountant(name: str) -> str:
    return _ACCOUNTANTS.get(name.lower(), f"'{name}' accountant")


# --------------------------------------------------------------------------------------------------
# Figures (privacy/documents.py renders the blocks and draws on a bare matplotlib Figure).
# --------------------------------------------------------------------------------------------------


def _new_axes(title: str, ylabel: str) -> tuple[Any, Any]:
    from matplotlib.ticker import MaxNLocator

    fig, ax = new_axes(title, "round", ylabel, size=(5.2, 3.6))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # rounds are whole numbers
    return fig, ax



def _plot_sample(sample: SampleLevel) -> bytes:
    fig, ax = _new_axes("Sample-level epsilon per client (composed)", "epsilon")
    colours: dict[str, Any] = {}
    for c in sample.clients:
        n = min(len(c.rounds), len(c.epsilon_per_round))
        if n:
            (line,) = ax.plot(c.rounds[:n], c.epsilon_per_round[:n], marker="o", drawstyle="steps-post",
                              label=f"client {c.client_id}")
            colours[c.client_id] = line.get_color()
    budgets = {c.client_id: c.budget_epsilon for c in sample.clients if c.budget_epsilon is not None}
    if len(set(budgets.values())) == 1:
        ax.axhline(next(iter(budgets.values())), linestyle="--", color="black", linewidth=1,
                   label=f"budget {next(iter(budgets.values())):g}")
    else:
        # Different budgets: each dashed line takes its client's colour so it can be matched by eye.
        for cid, value in budgets.items():
            ax.axhline(value, linestyle="--", linewidth=1, color=colours.get(cid, "black"),
                       label=f"budget of client {cid}: {value:g}")
    ax.set_ylim(bottom=0)
    if len(sample.clients) <= 12:
        ax.legend(fontsize=7)
    return png_bytes(fig)


def _plot_user(user: UserLevel, delta: float) -> bytes:
    fig, ax = _new_axes(f"User-level epsilon (delta = {fmt_delta(delta)})", "epsilon")
    rounds = list(range(1, len(user.epsilon_per_round) + 1))
    ax.plot(rounds, user.epsilon_per_round, marker="o", label=f"{user.accountant.upper()} (composed)")
    if user.epsilon_pld is not None and rounds:
        ax.plot([rounds[-1]], [user.epsilon_pld], marker="s", linestyle="none", label="PLD (final)")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=7)
    return png_bytes(fig)


def _plot_accuracy(rounds: list[RoundMetrics]) -> bytes:
    fig, ax = _new_axes("Server accuracy", "accuracy")
    ax.plot([r.round for r in rounds], [r.accuracy for r in rounds], marker="o", color="tab:green")
    return png_bytes(fig)


# --------------------------------------------------------------------------------------------------
# Content
# --------------------------------------------------------------------------------------------------


def _client_warnings(c: ClientRecord, delta: float, refusals: dict[tuple[str, int], str]) -> list[str]:
    out = []
    spent = [*c.epsilon_per_round, *([c.epsilon] if c.epsilon is not None else [])]
    worst = max(spent) if spent else None
    if c.budget_epsilon is not None and worst is not None and worst > c.budget_epsilon:
        out.append(
            f"BUDGET EXCEEDED: client {c.client_id} reached epsilon = {fmt_epsilon(worst)}, above its budget "
            f"epsilon = {c.budget_epsilon:g}. This should never happen: the budget guard must refuse a round "
            "before the budget is crossed. Treat it as a privacy incident: do not release this run's model "
            "and investigate the budget guard."
        )
    if c.epsilon is None:
        out.append(f"client {c.client_id} has no final epsilon recorded: its guarantee cannot be stated.")
    elif c.epsilon > WEAK_EPSILON:
        out.append(
            f"weak guarantee: client {c.client_id} has final epsilon = {fmt_epsilon(c.epsilon)}, above "
            f"{WEAK_EPSILON:g}; at this level an attacker's ability to tell whether one example was used is "
            "barely limited, so treat this client's data as weakly protected."
        )
    if c.num_examples and delta > 1.0 / c.num_examples:
        out.append(
            f"delta = {fmt_delta(delta)} is above 1/n = 1/{c.num_examples} for client {c.client_id}: a "
            "mechanism that publishes one of its examples in full would meet such a delta, so the guarantee "
            "is void; choose delta well below 1/n."
        )
    if c.budget_delta is not None and c.budget_delta != delta:
        out.append(
            f"client {c.client_id}'s budget is stated at delta = {fmt_delta(c.budget_delta)} but its "
            f"epsilon is reported at delta = {fmt_delta(delta)}: the two epsilons are not directly "
            "comparable."
        )
    for r in c.refused_rounds:
        reason = refusals.get((c.client_id, r))
        out.append(
            f"refused round: client {c.client_id}'s budget guard refused round {r}"
            + (f" (reason recorded: {reason})" if reason else "")
            + "; the client did not train in that round and spent no privacy in it."
        )
    lengths = {len(c.rounds), len(c.steps_per_round), len(c.epsilon_per_round)}
    if len(lengths) > 1:
        out.append(
            f"records inconsistent: client {c.client_id} lists {len(c.rounds)} rounds, "
            f"{len(c.steps_per_round)} step counts and {len(c.epsilon_per_round)} epsilons; "
            "they should match."
        )
    if c.epsilon is not None and c.epsilon_per_round and c.epsilon < max(c.epsilon_per_round):
        out.append(
            f"records inconsistent: client {c.client_id}'s final epsilon {fmt_epsilon(c.epsilon)} is below "
            f"its epsilon after an earlier round ({fmt_epsilon(max(c.epsilon_per_round))}); composed epsilon "
            "cannot decrease."
        )
    both = sorted(set(c.rounds) & set(c.refused_rounds))
    if both:
        out.append(f"records inconsistent: client {c.client_id} both trained and was refused in rounds "
                   f"{_ranges(tuple(both))}.")
    return out


def _user_warnings(u: UserLevel, delta: float) -> list[str]:
    out = []
    if u.epsilon is None:
        out.append("user level: no final epsilon recorded: the user-level guarantee cannot be stated.")
    elif u.epsilon > WEAK_EPSILON:
        out.append(
            f"weak guarantee: user-level epsilon = {fmt_epsilon(u.epsilon)} is above {WEAK_EPSILON:g}; "
            "whether one client took part at all is barely hidden."
        )
    if u.num_clients and delta > 1.0 / u.num_clients:
        out.append(
            f"delta = {fmt_delta(delta)} is above 1/num_clients = 1/{u.num_clients} at user level: "
            "a mechanism that publishes one client's data in full would meet such a delta; choose delta "
            "well below 1/num_clients."
        )
    if u.epsilon is not None and u.epsilon_per_round and u.epsilon < max(u.epsilon_per_round):
        out.append("records inconsistent: user-level final epsilon is below an earlier round's "
                   "composed epsilon.")
    return out


def _local_warnings(loc: LocalLevel) -> list[str]:
    out = [
        f"local DP: each round's update is {fmt_epsilon(loc.epsilon_per_round)}-DP on its own, but the same "
        f"client data is used in all {loc.rounds if loc.rounds is not None else 'the'} rounds, so over the "
        f"whole run the guarantee is epsilon = {fmt_epsilon(loc.epsilon_composed)} (composed). Quote the "
        "composed value, not the per-round one."
    ]
    if loc.epsilon_composed is not None and loc.epsilon_composed > WEAK_EPSILON:
        out.append(
            "weak guarantee: local DP composed over the run gives epsilon = "
            f"{fmt_epsilon(loc.epsilon_composed)}, above {WEAK_EPSILON:g}."
        )
    return out


def _is_fixed(u: UserLevel) -> bool:
    return (u.client_sampling or "").lower() in {"fixed", "fixed_size", "fixed-size", "uniform"}


def _user_relation(u: UserLevel) -> str:
    if _is_fixed(u):
        # privacy/accounting.py: m-of-N sampling has only a replace-one analysis, at noise multiplier z / 2.
        return ("replace one client: two federations are neighbours when one client's data is swapped for "
                "any other data (the analysis available for fixed-size sampling; swapping one update moves "
                "the sum by up to 2C, so the accountant uses noise multiplier z / 2).")
    return "add/remove one client together with all of its data."


def _sampling_words(u: UserLevel) -> str:
    q = _g(u.client_sampling_rate)
    n = u.num_clients if u.num_clients is not None else "the"
    kind = (u.client_sampling or "").lower()
    if kind == "poisson":
        return (f"Poisson sampling of clients: in every round each of the {n} clients takes part "
                f"independently with probability q = {q}, so the number of clients per round varies.")
    if _is_fixed(u):
        return (f"fixed-size sampling of clients: in every round a subset of size q x N (q = {q} of the {n} "
                "clients) is drawn uniformly without replacement.")
    if kind in {"none", "all", "full"}:
        return f"no client sampling: all {n} clients take part in every round (no amplification by sampling)."
    return f"client sampling recorded as '{u.client_sampling}' with rate q = {q}."


def _steps_history(c: ClientRecord) -> str:
    if not c.steps_per_round:
        return "not recorded"
    if len(set(c.steps_per_round)) == 1:
        return f"{c.steps_per_round[0]} steps in each of rounds {_ranges(c.rounds)}"
    return ", ".join(f"round {r}: {s}" for r, s in zip(c.rounds, c.steps_per_round, strict=False))


def _budget_command(z: float, q: float, steps: int, delta: float, accountant: str) -> str:
    # The one place that spells the `fedpriv budget` command line.
    return (f"fedpriv budget --noise-multiplier {z:g} --sample-rate {q:g} --steps {steps} "
            f"--delta {delta:g} --accountant {accountant}")


def _sample_section(p: PrivacyRecord, s: SampleLevel) -> list[Block]:
    lib = _library(p.library_versions, s.library)
    blocks: list[Block] = [
        Heading(2, "Sample-level guarantee"),
        Bullets((
            "Privacy unit: one example on one client. Each client's epsilon bounds how much the whole run "
            "(every model update it sent, and so the final model) can reveal about any single one of its "
            "examples.",
            "Neighbouring relation: add/remove one example: two datasets are neighbours when one equals the "
            "other with one example added or removed.",
            "Sampling model: Poisson sampling of examples: at every training step each of a client's "
            "examples joins the batch independently with probability q (the client's sample rate below), "
            "so batch sizes vary.",
            "Mechanism: DP-SGD: each example's gradient is clipped to norm C (clip norm) and Gaussian "
            "noise with standard deviation z x C (z = noise multiplier) is added to the sum of clipped "
            "gradients at every step.",
            f"delta = {fmt_delta(p.delta)} for every client.",
            f"Accountant: {_accountant(s.accountant)}, computed with {lib} (as recorded in privacy.json).",
            "Composition: each client's epsilon is composed over all rounds it trained in (all its steps), "
            "not per round. Epsilon values are rounded up to two decimals, so they never understate the "
            "record.",
        )),
    ]
    rows = []
    for c in s.clients:
        budget = "none"
        if c.budget_epsilon is not None:
            budget = f"epsilon {c.budget_epsilon:g}"
            if c.budget_delta is not None:
                budget += f" at delta {fmt_delta(c.budget_delta)}"
        rows.append((
            c.client_id,
            str(c.num_examples) if c.num_examples is not None else "not recorded",
            _g(c.noise_multiplier), _g(c.max_grad_norm), _g(c.sample_rate),
            f"{len(c.rounds)} ({_ranges(c.rounds)})" if c.rounds else "none",
            str(sum(c.steps_per_round)), fmt_epsilon(c.epsilon), budget,
            _ranges(c.refused_rounds) if c.refused_rounds else "none",
        ))
    blocks.append(Table(("Client", "Examples", "Noise multiplier", "Clip norm", "Sample rate",
                         "Rounds taken part", "Total steps", "Final epsilon", "Budget", "Refused rounds"),
                        tuple(rows)))
    return blocks


def _user_section(p: PrivacyRecord, u: UserLevel) -> list[Block]:
    lib = _library(p.library_versions, u.library)
    accountants = _accountant(u.accountant)
    if u.epsilon_pld is not None:
        accountants += f", and the {_ACCOUNTANTS['pld']} side by side"
    return [
        Heading(2, "User-level guarantee"),
        Bullets((
            "Privacy unit: all the data of one client. The epsilon bounds how much the whole run (every "
            "aggregated model, and so the final model) can reveal about whether one client took part at all, "
            "whatever its data.",
            f"Neighbouring relation: {_user_relation(u)}",
            f"Sampling model: {_sampling_words(u)}",
            f"Mechanism: each client's model update is clipped to norm C = {_g(u.clipping_norm)} "
            f"({u.clipping or 'unrecorded'} clipping) and Gaussian noise with standard deviation z x C "
            f"(z = {_g(u.noise_multiplier)}) is added to the sum of the updates on the server.",
            f"delta = {fmt_delta(p.delta)}.",
            f"Accountant: {accountants}, computed with {lib} (as recorded in privacy.json).",
            "Composition: epsilon is composed over all rounds of the run, not per round.",
        )),
        Table(("Setting", "Value"), (
            ("noise multiplier z", _g(u.noise_multiplier)),
            ("clipping norm C", _g(u.clipping_norm)),
            ("clipping", u.clipping or "not recorded"),
            ("client sampling", u.client_sampling or "not recorded"),
            ("client sampling rate q", _g(u.client_sampling_rate)),
            ("number of clients", str(u.num_clients) if u.num_clients is not None else "not recorded"),
            ("rounds accounted", str(len(u.epsilon_per_round))),
        )),
        Table(("delta", f"epsilon ({u.accountant.upper()})", "epsilon (PLD)"),
              ((fmt_delta(p.delta), fmt_epsilon(u.epsilon),
                fmt_epsilon(u.epsilon_pld) if u.epsilon_pld is not None else "not computed"),)),
    ]


def _local_section(loc: LocalLevel) -> list[Block]:
    blocks: list[Block] = [
        Heading(2, "Local DP"),
        Bullets((
            "Privacy unit: all the data of one client, protected before it leaves the client: each client "
            "randomises its own update, so the guarantee holds even against the server.",
            f"Per round: epsilon = {fmt_epsilon(loc.epsilon_per_round)} for each release, "
            f"sensitivity {_g(loc.sensitivity)}.",
            f"Composed over {loc.rounds if loc.rounds is not None else 'all'} rounds: epsilon = "
            f"{fmt_epsilon(loc.epsilon_composed)}. This is the guarantee for the whole run.",
        )),
    ]
    if loc.note:
        blocks.append(Para(f"Note recorded with the run: {loc.note}"))
    return blocks


def _secure_section(sec: dict[str, Any], delta: float) -> list[Block]:
    """Runs with secure aggregation: the trust model in words and, for distributed DP, what replaces the
    server's Gaussian noise of the user-level section."""
    where = "privacy.json.secure_aggregation"
    blocks: list[Block] = [
        Heading(2, "Secure aggregation and trust model"),
        Para(_str(sec, "trust_model", where) or "not recorded"),
        Table(("Setting", "Value"), (
            ("protocol", _str(sec, "protocol", where) or "not recorded"),
            ("threshold (survivors needed to release a round)", str(_int(sec, "threshold", where))),
            ("share holders per client (0 = all sampled)", str(_int(sec, "shares", where))),
            ("ring Z_2^bits, bits", str(_int(sec, "bits", where))),
            ("survivors per released round", ", ".join(map(str, _int_list(sec, "survivors_per_round", where)))),
        )),
    ]
    ddp = sec.get("distributed_dp")
    if isinstance(ddp, dict):
        w = where + ".distributed_dp"
        amplified = _num(ddp, "epsilon_amplified", w)
        blocks += [
            Para(_distributed_noise_words(ddp)),
            Table(("delta", "epsilon (no sampling credit: holds against the server)",
                   "epsilon (Poisson sampling credited: not against the server)"),
                  ((fmt_delta(delta), fmt_epsilon(_num(ddp, "epsilon", w)),
                    fmt_epsilon(amplified) if amplified is not None else "not applicable"),)),
            Table(("Setting", "Value"), tuple((k, _g(_num(ddp, k, w))) for k in (
                "clip_norm", "noise_multiplier", "gamma", "norm_bound", "inflation", "client_lambda",
                "padded_dim"))),
        ]
    return blocks


def _check_section(p: PrivacyRecord) -> list[Block]:
    blocks: list[Block] = [
        Heading(2, "How to check this"),
        Para("An accountant needs only each mechanism's history: a list of (noise multiplier z, sample "
             "rate q, number of steps). Feed the histories below to an independent accountant (add/remove "
             f"neighbouring relation, delta = {fmt_delta(p.delta)}) and compare with the epsilons above; "
             "differences in the last decimals come from the accountant's numerical grid."),
    ]
    if p.sample is not None and p.sample.clients:
        rows = tuple((c.client_id, _g(c.noise_multiplier, 6), _g(c.sample_rate, 6), _steps_history(c),
                      str(sum(c.steps_per_round)),
                      ", ".join(f"{r}: {fmt_epsilon(e)}" for r, e in zip(c.rounds, c.epsilon_per_round,
                                                                          strict=False)) or "none",
                      fmt_epsilon(c.epsilon)) for c in p.sample.clients)
        blocks.append(Table(("Client", "Noise multiplier z", "Sample rate q", "Steps", "Total steps",
                             "Epsilon after each round", "Final epsilon"), rows))
        example = next((c for c in p.sample.clients if c.rounds and c.steps_per_round and c.epsilon_per_round
                        and c.noise_multiplier is not None and c.sample_rate is not None), None)
        if example is not None:
            assert example.noise_multiplier is not None and example.sample_rate is not None
            blocks.append(Para(
                f"Example: client {example.client_id}'s round {example.rounds[0]} on its own (its first "
                "round, so the composed epsilon after it is the single round's epsilon); expected epsilon "
                f"about {fmt_epsilon(example.epsilon_per_round[0])}:"))
            blocks.append(Code(_budget_command(example.noise_multiplier, example.sample_rate,
                                               example.steps_per_round[0], p.delta, p.sample.accountant)))
            looser = "" if p.sample.accountant.lower() == "rdp" else (
                f" or somewhat more: RDP is a looser bound than the {p.sample.accountant.upper()} accountant "
                "used for the record")
            blocks.append(Para(
                "The same client over the whole run, with Google's dp-accounting library (RDP); expected "
                f"epsilon about {fmt_epsilon(example.epsilon)}{looser}:"))
            blocks.append(Code(
                "import dp_accounting\n"
                "from dp_accounting.rdp import RdpAccountant\n"
                "acc = RdpAccountant()  # add/remove one example\n"
                f"step = dp_accounting.PoissonSampledDpEvent({example.sample_rate!r}, "
                f"dp_accounting.GaussianDpEvent({example.noise_multiplier!r}))\n"
                f"acc.compose(step, {sum(example.steps_per_round)})\n"
                f"print(acc.get_epsilon({p.delta!r}))"))
    if p.user is not None:
        u = p.user
        blocks.append(Para(
            f"User level: history (z = {_g(u.noise_multiplier, 6)}, q = {_g(u.client_sampling_rate, 6)} "
            f"client sampling, {len(u.epsilon_per_round)} rounds, one step per round); expected epsilon "
            f"{fmt_epsilon(u.epsilon)} (RDP)"
            + (f" and {fmt_epsilon(u.epsilon_pld)} (PLD)." if u.epsilon_pld is not None else ".")))
        if (u.client_sampling or "").lower() == "poisson" and u.noise_multiplier is not None \
                and u.client_sampling_rate is not None:
            blocks.append(Code(_budget_command(u.noise_multiplier, u.client_sampling_rate,
                                               len(u.epsilon_per_round), p.delta, u.accountant)))
    return blocks


def _summary(p: PrivacyRecord, metrics: list[RoundMetrics], n_warnings: int, incidents: int) -> str:
    parts = []
    if p.sample is not None:
        known = [c for c in p.sample.clients if c.epsilon is not None]
        if known:
            worst = max(known, key=lambda c: c.epsilon or 0.0)
            parts.append(
                f"Sample level: every client's data got at most epsilon = {fmt_epsilon(worst.epsilon)} at "
                f"delta = {fmt_delta(p.delta)} (sample level): adding or removing one example on one client "
                "changes the probability of any outcome of the whole run by at most a factor e^epsilon, "
                f"plus delta. The highest value is client {worst.client_id}'s; {len(p.sample.clients)} "
                "clients are listed below."
            )
            missing = len(p.sample.clients) - len(known)
            if missing:
                parts.append(f"{missing} client(s) have no epsilon recorded and are not covered by that "
                             "bound.")
        else:
            parts.append("Sample level: no client has an epsilon recorded.")
    if p.user is not None:
        pld = f"; the PLD accountant gives {fmt_epsilon(p.user.epsilon_pld)}" \
            if p.user.epsilon_pld is not None else ""
        parts.append(
            "User level: all the data of any one client got at most epsilon = "
            f"{fmt_epsilon(p.user.epsilon)} at delta = {fmt_delta(p.delta)} "
            f"({p.user.accountant.upper()} accountant{pld})."
        )
    if p.local is not None:
        parts.append(
            f"Local DP: epsilon = {fmt_epsilon(p.local.epsilon_per_round)} per round, "
            f"{fmt_epsilon(p.local.epsilon_composed)} composed over the run."
        )
    if p.sample is None and p.user is None and p.local is None:
        parts.append("privacy.json records no differential-privacy guarantee at any level.")
    with_acc = [m for m in metrics if m.accuracy is not None]
    if with_acc:
        last = with_acc[-1]
        parts.append(f"Final server accuracy: {last.accuracy:.4f} (round {last.round}).")
        if last.ema_accuracy is not None:
            parts.append(f"The moving average of the global model (ema-decay), reported separately: "
                         f"{last.ema_accuracy:.4f}; it is post-processing of models the server already holds, "
                         "so it costs no privacy beyond the epsilon above.")
    else:
        parts.append("No server accuracy was recorded.")
    if incidents:
        parts.append(f"{incidents} client(s) EXCEEDED their privacy budget: see the warnings.")
    parts.append(f"{n_warnings} warning(s) below." if n_warnings else "No warnings.")
    return " ".join(parts)


def _rounds_table(metrics: list[RoundMetrics]) -> Table:
    def entries(items: tuple[tuple[str, str], ...]) -> str:
        return "; ".join(f"{cid} ({why})" if why else cid for cid, why in items) or "none"

    return Table(("Round", "Server accuracy", "Server loss", "Clients trained", "Refused", "Dropped"), tuple(
        (str(m.round), _g(m.accuracy), _g(m.loss),
         f"{len(m.trained)} ({_ids(m.trained)})" if m.trained else "0",
         entries(m.refused), entries(m.dropped)) for m in metrics))


def _build(run_dir: Path) -> tuple[list[Block], str]:
    privacy_path = run_dir / "privacy.json"
    if not privacy_path.is_file():
        raise _fail(f"no privacy.json in '{run_dir}'",
                    "pass the folder a DP training run wrote its records into")
    raw = _load_json(privacy_path, "privacy.json")
    p = _parse_privacy(raw)
    metrics_path = run_dir / "metrics.json"
    metrics = list(_parse_metrics(_load_json(metrics_path, "metrics.json"))) if metrics_path.is_file() else []
    config_path = run_dir / "config.toml"
    config_text = config_path.read_text(encoding="utf-8", errors="replace") if config_path.is_file() else None

    refusals = {(cid, m.round): why for m in metrics for cid, why in m.refused}
    warnings: list[str] = []
    if p.sample is None and p.user is None and p.local is None:
        warnings.append("no DP guarantee: privacy.json records no sample-level, user-level or local DP.")
    if p.sample is not None:
        for c in p.sample.clients:
            warnings += _client_warnings(c, p.delta, refusals)
    if p.user is not None:
        warnings += _user_warnings(p.user, p.delta)
    if p.local is not None:
        warnings += _local_warnings(p.local)
    audit = read_audit(run_dir, ReportError)
    if audit is not None and (violation := audit_warning(audit)) is not None:
        warnings.append(violation)
    # Incidents first: a reader who stops after the first line must see them.
    warnings.sort(key=lambda w: not w.startswith(("BUDGET EXCEEDED", "AUDIT VIOLATION")))
    incidents = sum(w.startswith(("BUDGET EXCEEDED", "AUDIT VIOLATION")) for w in warnings)

    mtime = dt.datetime.fromtimestamp(privacy_path.stat().st_mtime, tz=dt.UTC)
    written = mtime.strftime("%Y-%m-%d %H:%M UTC")
    title = f"Privacy report: {run_dir.name}"
    blocks: list[Block] = [
        Heading(1, title),
        Bullets((
            f"Run folder: {run_dir}",
            f"Records: privacy.json (schema_version {SCHEMA_VERSION}, last written {written}); "
            f"metrics.json {'present' if metrics_path.is_file() else 'absent'}; "
            f"config.toml {'present' if config_text is not None else 'absent'}.",
            "This report is rebuilt from those records alone by: fedpriv report RUN_DIR",
        )),
        Heading(2, "Summary"),
        Para(_summary(p, metrics, len(warnings), incidents)),
        Heading(2, "Warnings"),
        Bullets(tuple(warnings), warning=True) if warnings else Para("None."),
    ]
    if p.sample is not None:
        blocks += _sample_section(p, p.sample)
    if p.user is not None:
        blocks += _user_section(p, p.user)
    if p.local is not None:
        blocks += _local_section(p.local)
    if isinstance(raw, dict) and isinstance(raw.get("secure_aggregation"), dict):
        blocks += _secure_section(raw["secure_aggregation"], p.delta)

    plots = []
    if p.sample is not None and any(c.epsilon_per_round for c in p.sample.clients):
        plots.append(Figure(FIG_SAMPLE, "Sample-level epsilon over rounds per client; dashed: budget.",
                          _plot_sample(p.sample)))
    if p.user is not None and p.user.epsilon_per_round:
        plots.append(Figure(FIG_USER, "User-level epsilon over rounds.", _plot_user(p.user, p.delta)))
    with_acc = [m for m in metrics if m.accuracy is not None]
    if with_acc:
        plots.append(Figure(FIG_ACCURACY, "Server accuracy over rounds.", _plot_accuracy(with_acc)))
    if plots:
        blocks += [Heading(2, "Privacy spent and accuracy over rounds"), FigureRow(tuple(plots))]
    if metrics:
        blocks += [Heading(2, "Rounds"), _rounds_table(metrics)]

    blocks += _check_section(p)
    if audit is not None:
        blocks += audit_section(audit)
    blocks += _post_processing_section(run_dir, config_text)
    blocks += [
        Heading(2, "What is not counted here"),
        Bullets((
            "Hyperparameter choices made on private data spend privacy too: every run tried while tuning the "
            "learning rate, clip norm, noise multiplier, number of rounds or model, and every evaluation on "
            "private data used to choose between them, reveals something. Those costs are not counted in "
            "this report.",
            "The report checks the records, not the code: it assumes the run implemented the recorded "
            "mechanism (sampling, clipping, noise) faithfully.",
        )),
        Heading(2, "Software"),
        Table(("Library", "Version"), tuple(sorted(p.library_versions.items())) or (("none recorded", ""),)),
        Heading(2, "Run configuration (config.toml, verbatim)"),
        Code(config_text.rstrip("\n")) if config_text is not None else Para("config.toml is absent."),
    ]
    return blocks, title


def _post_processing_section(run_dir: Path, config_text: str | None) -> list[Block]:
    """Compressed updates and generated text: what was done to private outputs, at no privacy cost."""
    import tomllib

    blocks: list[Block] = []
    try:
        compress = str(tomllib.loads(config_text or "").get("compress", "none"))
    except tomllib.TOMLDecodeError:
        compress = "none"
    if compress != "none":
        blocks.append(Para(f"Client updates were compressed ({compress}) after DP-SGD or local DP noise was "
                           "applied: compression is post-processing of a private output, so the epsilon above "
                           "is unchanged by it (for user-level DP the server clips the decoded update, which "
                           "bounds its sensitivity whatever the client sent)."))
    sample_path = run_dir / "sample.json"
    if sample_path.is_file():
        sample = _obj(_load_json(sample_path, "sample.json"), "sample.json")
        prompt, text = _str(sample, "prompt", "sample.json") or "", _str(sample, "text", "sample.json") or ""
        blocks += [
            Para(f"A sample of the trained character language model (temperature "
                 f"{_g(_num(sample, 'temperature', 'sample.json'))}, seed {_int(sample, 'seed', 'sample.json')}; "
                 "prompt, then what the model wrote). Generated text is post-processing of the DP-trained model: "
                 "drawing samples, any number of them, reads only the model and costs no privacy beyond what "
                 "training spent. Write more with: fedpriv generate RUN_DIR --prompt TEXT"),
            Code(prompt + text),
        ]
    return [Heading(2, "Post-processing (no privacy cost)"), *blocks] if blocks else []


def render_reports(run_dir: str | Path) -> tuple[Path, Path]:
    """Write RUN_DIR/report.md (plus its PNG figures) and RUN_DIR/report.html; return (md, html) paths."""
    folder = Path(run_dir).resolve()
    if not folder.is_dir():
        raise _fail(f"run folder '{run_dir}' does not exist or is not a folder",
                    "pass the folder a DP training run wrote its records into")
    blocks, title = _build(folder)
    return write_documents(folder, Path(REPORT_MD).stem, blocks, title)


def run_report(args: argparse.Namespace) -> int:
    """`fedpriv report RUN_DIR`: rebuild the reports, print their paths; one-line error and 2 on failure."""
    try:
        md_path, html_path = render_reports(args.run_dir)
    except ReportError as exc:
        print(f"fedpriv report: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"fedpriv report: error: cannot read or write in '{args.run_dir}': {exc.strerror or exc} "
              "(check the folder's permissions and free disk space)", file=sys.stderr)
        return 2
    print(md_path)
    print(html_path)
    return 0


def register(subparsers: Any) -> None:
    """Add the `report` sub-command to an argparse subparsers object."""
    parser = subparsers.add_parser(
        "report", help="rebuild report.md and report.html of a DP run from its records",
        description="Rebuild RUN_DIR/report.md and RUN_DIR/report.html from privacy.json, metrics.json and "
                    "config.toml in RUN_DIR.")
    parser.add_argument("run_dir", metavar="RUN_DIR", help="output folder of a DP training run")
    parser.set_defaults(func=run_report)


def _distributed_noise_words(ddp: dict) -> str:
    """What the distributed DP paragraph says, by the noise the clients added."""
    if ddp.get("noise") == "discrete-gaussian":
        noise, bound = "discrete Gaussian", ("the distributed discrete Gaussian RDP bound (Kairouz, Liu, Steinke "
                                             "2021, Proposition 14)")
    else:
        noise, bound = "Skellam", "the Skellam RDP bound (Agarwal, Kairouz, Liu 2021)"
    return (f"Distributed DP: the user-level noise above is not added by the server. Each client adds integer "
            f"{noise} noise to its rotated, scaled, rounded update before masking; the sum of the survivors' "
            f"noise is the mechanism's noise. The user-level epsilon is {bound} at the number of clients that "
            "survived each round, with no credit for client sampling.")
