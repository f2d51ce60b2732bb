"""`fedpriv sweep`: runs over every combination of values of some run-config keys, with a summary.

    fedpriv sweep --set learning-rate=0.01,0.05,0.1 --set local-epochs=1,2 --dataset digits --out runs/lr

Each combination is one ordinary run folder under OUT/runs/ (finished ones are kept, so a sweep resumes);
OUT/sweep.csv, sweep.json, sweep.md and sweep.html summarize them. Values are separated by commas; a value
that holds commas itself (dp=sample,user) is swept by separating the values with ';' instead
(--set 'dp=none;sample,user'). A key given one value is a fixed setting for every run.

Choosing hyperparameters by looking at runs on private data is itself a use of that data: the epsilon each
DP run reports covers that run alone, and the report says how much the selection adds on top.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common import ConfigError
from privacy.documents import Block, Bullets, Figure, Heading, Para, Table, write_documents
from privacy.files import write_atomic
from server.records import clean
from simulations.cells import RUNS, Cell, GridResult, cell_folder_name, run_grid
from simulations.compare import check_run_config
from simulations.comparison_report import (
    group,
    mean_std,
    plot_accuracy_vs_work,
    rows_csv,
)
from simulations.outcomes import RunOutcome, read_outcome
from simulations.runconfig import resolve
from simulations.simulate import RUN_FLAGS, add_run_flags, overrides_from

OUTCOME_COLUMNS = ("final_accuracy", "best_accuracy", "best_round", "final_f1_macro", "rounds_to_target",
                   "epsilon", "delta", "client_accuracy_min", "client_accuracy_max", "sgd_steps", "seconds",
                   "dropped_updates", "refused_updates", "run_dir")
FIG_WORK = "sweep_accuracy_vs_work.png"


def parse_sweep(items: Sequence[str]) -> tuple[dict[str, list[str]], dict[str, str]]:
    """(swept key -> values, fixed key -> value) from --set KEY=V1,V2,... items, in the order given."""
    swept: dict[str, list[str]] = {}
    fixed: dict[str, str] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key or not raw.strip():
            raise ConfigError(f"--set {item!r} is not KEY=V1,V2,...; write e.g. --set learning-rate=0.01,0.1")
        if key in swept or key in fixed:
            raise ConfigError(f"--set names {key!r} twice; give all its values in one --set {key}=V1,V2")
        values = [v.strip() for v in raw.split(";" if ";" in raw else ",")]
        if any(not v for v in values) or len(set(values)) != len(values):
            raise ConfigError(f"--set {item!r} has an empty or repeated value; list distinct values, e.g. "
                              f"--set {key}=0.01,0.1")
        if key in ("out-dir", "resume-from"):
            raise ConfigError(f"--set {key} cannot be swept: each run's folder is OUT/runs/<values>; use "
                              "--out")
        if len(values) == 1:
            fixed[key] = values[0]
        else:
            swept[key] = values
    if not swept:
        raise ConfigError("nothing to sweep: give at least one --set KEY=V1,V2 with two or more values")
    return swept, fixed


@dataclass(frozen=True)
class SweepPlan:
    swept: Mapping[str, Sequence[str]]
    cells: Sequence[Cell]
    target_accuracy: float


def plan_sweep(config_file: str | None, overrides: Mapping[str, Any], swept: Mapping[str, Sequence[str]],
               out: Path, target_accuracy: float) -> SweepPlan:
    """One resolved, checked run config per combination of the swept values."""
    out = out.resolve()
    cells = []
    for combo in itertools.product(*swept.values()):
        values = dict(zip(swept, combo, strict=True))
        name = cell_folder_name([f"{k}={v}" for k, v in values.items()])
        run = resolve(config_file, {**overrides, **values, "out-dir": str(out / RUNS / name)})
        check_run_config(run)
        # Labels keep the values as resolved (typed), so 0.10 and 0.1 are one value in the summary.
        cells.append(Cell(name, {k: run[k] for k in swept}, run))
    return SweepPlan(swept, cells, target_accuracy)


@dataclass
class SweepResult:
    out: Path
    plan: SweepPlan
    grid: GridResult
    files: dict[str, Path] = field(default_factory=dict)


def sweep(plan: SweepPlan, out: str | Path, echo: Callable[[str], None] = print) -> SweepResult:
    out = Path(out).expanduser().resolve()
    grid = run_grid(plan.cells, echo)
    files = write_sweep(plan, out)
    return SweepResult(out, plan, grid, files)


def sweep_rows(plan: SweepPlan, out: Path) -> tuple[list[dict[str, Any]], dict[str, RunOutcome]]:
    rows, outcomes = [], {}
    for cell in plan.cells:
        o = read_outcome(cell.run_dir, plan.target_accuracy)
        lo, _, hi = o.client_spread()
        run_dir = str(o.run_dir.relative_to(out))
        # "series" and "privacy" are what the shared work figure groups by: here one combination each.
        rows.append({**cell.labels, "setting": cell.name, "series": cell.name,
                     "privacy": str(cell.run_config.get("dp", "none")),
                     "final_accuracy": o.final_accuracy, "best_accuracy": o.best_accuracy,
                     "best_round": o.best_round, "final_f1_macro": o.final_f1_macro,
                     "rounds_to_target": o.rounds_to_target, "epsilon": o.epsilon, "delta": o.delta,
                     "client_accuracy_min": lo, "client_accuracy_max": hi, "sgd_steps": o.sgd_steps,
                     "seconds": round(o.seconds, 2), "dropped_updates": o.dropped_updates,
                     "refused_updates": o.refused_updates, "run_dir": run_dir})
        outcomes[run_dir] = o
    return rows, outcomes


def selection_note(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """What choosing among these runs costs in privacy, and what no run's epsilon counts."""
    k = len(rows)
    private = [r for r in rows if r["epsilon"] is not None]
    lines = [
        f"Choosing hyperparameters by comparing these {k} runs uses the data they trained on (and the server "
        "test set they were scored on): the choice is itself a computation on the data, so it spends privacy "
        "and overfits the test set. No run's epsilon counts it."]
    if not private:
        lines.append("None of these runs is differentially private, so none carries any guarantee; a private "
                     "sweep needs DP in every run, and then the selection still adds to the privacy cost.")
        return lines
    total = sum(float(r["epsilon"]) for r in private)
    largest = max(float(r["epsilon"]) for r in private)
    deltas = sum(float(r["delta"]) for r in private)
    lines.append(
        f"{len(private)} of the {k} runs are DP, each reported at its own epsilon (largest {largest:.3g}). "
        f"Trained on the same clients' data, the whole sweep spends up to {total:.3g} (delta {deltas:.3g}) "
        f"by basic composition, the sum over runs: {total / largest:.3g} times the largest single run's "
        f"epsilon. Releasing only the selected run does not lower this: the selection looked at all {k}.")
    if len(private) < k:
        lines.append(f"{k - len(private)} of the runs are not DP: they used the same data with no guarantee "
                     "at all; as their results inform the choice, the sweep as a whole has none either.")
    lines.append(
        "Tighter bounds exist for private selection (Liu and Talwar, STOC 2019; Papernot and Steinke, ICLR "
        "2022: running a random number of trials and releasing the best costs a small constant multiple of "
        "one run's epsilon), but only when the number of runs is random and the selection follows their "
        "protocol, which this sweep does not do. The reports count none of it: choose hyperparameters on "
        "public or proxy data, or add the sum above to the budget.")
    return lines


def write_sweep(plan: SweepPlan, out: Path) -> dict[str, Path]:
    rows, outcomes = sweep_rows(plan, out)
    keys = list(plan.swept)
    columns = [*keys, "privacy", *OUTCOME_COLUMNS]
    files = {"csv": out / "sweep.csv", "json": out / "sweep.json"}
    write_atomic(files["csv"], rows_csv(rows, columns).encode("utf-8"))
    # Over seeds only when the seed is swept: then each other combination is summarized across them.
    by = [k for k in keys if k != "seed"] if "seed" in keys else []
    summary = []
    for values, members in group(rows, by).items() if by else []:
        acc, sd = mean_std([r["final_accuracy"] for r in members])
        eps, _ = mean_std([r["epsilon"] for r in members])
        summary.append({**dict(zip(by, values, strict=True)), "runs": len(members),
                        "final_accuracy_mean": acc, "final_accuracy_std": sd, "epsilon_mean": eps})
    note = selection_note(rows)
    document = {"swept": {k: list(v) for k, v in plan.swept.items()}, "columns": columns, "rows": rows,
                "summary": summary, "privacy_note": note}
    write_atomic(files["json"], (json.dumps(clean(document), indent=1) + "\n").encode("utf-8"))

    swept_text = "; ".join(f"{k} in {{{', '.join(map(str, v))}}}" for k, v in plan.swept.items())
    best = max(rows, key=lambda r: r["final_accuracy"] if math.isfinite(r["final_accuracy"]) else -1)
    blocks: list[Block] = [
        Heading(1, f"Sweep over {', '.join(keys)}"),
        Para(f"{len(rows)} runs: {swept_text}. Each run's records are in its folder under runs/; accuracy is "
             "the server's test set after the last round."),
        Heading(2, "Runs"),
        Table((*keys, "privacy", "final accuracy", "best accuracy (round)", "macro F1",
               f"rounds to {plan.target_accuracy:g}", "epsilon", "seconds", "run"),
              tuple((*(str(r[k]) for k in keys), r["privacy"], _f(r["final_accuracy"]),
                     f"{_f(r['best_accuracy'])} ({r['best_round']})", _f(r["final_f1_macro"]),
                     _f(r["rounds_to_target"]), _f(r["epsilon"]), _f(r["seconds"]), r["run_dir"])
                    for r in rows)),
        Para(f"Highest final accuracy: {best['run_dir']} ({best['final_accuracy']:.4f})."),
    ]
    if summary:
        blocks += [Heading(2, "Over seeds (mean ± sd)"),
                   Table((*by, "runs", "final accuracy", "epsilon"),
                         tuple((*(str(s[k]) for k in by), str(s["runs"]),
                                f"{_f(s['final_accuracy_mean'])} ± {_f(s['final_accuracy_std'])}",
                                _f(s["epsilon_mean"])) for s in summary))]
    blocks += [
        Heading(2, "Privacy spent by choosing"),
        Bullets(tuple(note)),
        Heading(2, "Accuracy"),
        Figure(FIG_WORK, "Server test accuracy of every run against passes over the training data.",
               plot_accuracy_vs_work(rows, outcomes, list(dict.fromkeys(r["privacy"] for r in rows)))),
    ]
    files["md"], files["html"] = write_documents(out, "sweep", blocks, f"Sweep over {', '.join(keys)}")
    files["figure"] = out / FIG_WORK
    return files


def _f(value: Any) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


# ------------------------------------------------------------------------------------------- the command


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "sweep", conflict_handler="resolve",
        help="runs over every combination of values of run-config keys, with a summary",
        description="Run every combination of the --set values (each one run folder under --out/runs/, "
                    "finished runs kept) and write sweep.csv/.json/.md/.html. The other flags are fixed for "
                    "every run.")
    add_run_flags(p)
    # Replaces the run flags' --set: here a key takes a list of values.
    p.add_argument("--set", action="append", default=[], metavar="KEY=V1,V2,...", required=True,
                   help="a run-config key and its values, comma-separated (';' when values hold commas); "
                        "repeatable: every combination runs")
    p.add_argument("--out", required=True, help="folder for runs/ and the sweep files")
    p.add_argument("--target-accuracy", type=float, default=0.8, help="for 'rounds to reach' (default 0.8)")
    p.set_defaults(func=run_sweep)


def run_sweep(args: argparse.Namespace) -> int:
    swept, fixed = parse_sweep(args.set)
    if not 0 < args.target_accuracy <= 1:
        raise ConfigError(f"--target-accuracy {args.target_accuracy} is out of range; it must be in (0, 1]")
    flags = [f for f in RUN_FLAGS if f != "out"]
    args.set = []  # consumed above; overrides_from would read them as single KEY=VALUE settings
    overrides = {**overrides_from(args, flags), **fixed}
    clash = sorted(set(overrides) & set(swept))
    if clash:
        raise ConfigError(f"{clash[0]!r} is both swept (--set) and fixed by a flag; drop one of them")
    from common.paths import output_dir

    out = output_dir(args.out, "--out")
    result = sweep(plan_sweep(args.config, overrides, swept, out, args.target_accuracy), out)
    print(f"{len(result.grid.ran)} runs made, {len(result.grid.skipped)} kept from before; records under "
          f"{out / RUNS}")
    for key in ("csv", "json", "md", "html"):
        print(f"sweep.{key}: {result.files[key]}")
    return 0
