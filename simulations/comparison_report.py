"""The comparison's outputs, built from the cells' records alone: comparison.csv and comparison.json (one row
per cell), comparison.md and comparison.html (summary, compute budgets, figures, every cell), the figures as
PNG files. Rebuilding them never reruns anything.
"""

from __future__ import annotations

import csv
import io
import json
import math
import statistics
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from common import parse_partition
from privacy.documents import (
    Block,
    Bullets,
    Figure,
    Heading,
    Para,
    Table,
    new_axes,
    png_bytes,
    write_documents,
)
from privacy.files import write_atomic
from simulations.cells import Cell
from simulations.compare import ARM_TABLES, CENTRALIZED, NO_DP, CompareConfig
from simulations.outcomes import RunOutcome, read_outcome

COLUMNS = ("arm", "series", "setting", "partition", "alpha", "num_clients", "privacy", "target_epsilon", "seed",
           "rounds",
           "final_accuracy", "best_accuracy", "best_round", "final_f1_macro", "target_accuracy",
           "rounds_to_target", "passes_to_target", "epsilon", "delta", "client_accuracy_min",
           "client_accuracy_mean", "client_accuracy_max", "train_examples", "sgd_steps",
           "max_client_steps_per_round", "seconds", "dropped_updates", "refused_updates", "upload_bytes", "run_dir")
FIG_WORK = "fig_accuracy_vs_work.png"
FIG_EPSILON = "fig_accuracy_vs_epsilon.png"
FIG_ALPHA = "fig_accuracy_vs_alpha.png"
FIG_SPREAD = "fig_client_spread.png"
LINESTYLES = ("-", "--", ":", "-.")


def cell_row(cell: Cell, outcome: RunOutcome, out: Path, target_accuracy: float) -> dict[str, Any]:
    spec = parse_partition(cell.labels["partition"]) if cell.labels["partition"] else None
    lo, mean, hi = outcome.client_spread()
    arm = str(cell.labels.get("arm", ""))
    return {
        "arm": arm,
        # What figures and tables name a line by: the setting, prefixed by the arm when the grid has arms.
        "series": f"{arm}: {cell.labels['setting']}" if arm else cell.labels["setting"],
        "setting": cell.labels["setting"],
        "partition": cell.labels["partition"],
        "alpha": float(spec.param) if spec is not None and spec.kind == "dirichlet" else None,
        "num_clients": outcome.num_clients,
        "privacy": cell.labels["privacy"],
        "target_epsilon": cell.labels["target_epsilon"],
        "seed": cell.labels["seed"],
        "rounds": outcome.rounds[-1],
        "final_accuracy": outcome.final_accuracy,
        "best_accuracy": outcome.best_accuracy,
        "best_round": outcome.best_round,
        "final_f1_macro": outcome.final_f1_macro,
        "target_accuracy": target_accuracy,
        "rounds_to_target": outcome.rounds_to_target,
        "passes_to_target": outcome.passes_to_target,
        "epsilon": outcome.epsilon,
        "delta": outcome.delta,
        "client_accuracy_min": lo,
        "client_accuracy_mean": mean,
        "client_accuracy_max": hi,
        "train_examples": outcome.train_examples,
        "sgd_steps": outcome.sgd_steps,
        "max_client_steps_per_round": outcome.max_client_steps_per_round,
        "seconds": round(outcome.seconds, 2),
        "dropped_updates": outcome.dropped_updates,
        "refused_updates": outcome.refused_updates,
        "upload_bytes": outcome.upload_bytes,
        "run_dir": str(outcome.run_dir.relative_to(out)) if outcome.run_dir.is_relative_to(out)
        else str(outcome.run_dir),
    }


def rows_csv(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: "" if row.get(k) is None else row[k] for k in columns})
    return buffer.getvalue()


Row = Mapping[str, Any]


def group(rows: Iterable[Row], keys: Sequence[str]) -> dict[tuple[Any, ...], list[Row]]:
    """Rows by the values of `keys`, in first-seen order."""
    out: dict[tuple[Any, ...], list[Row]] = {}
    for row in rows:
        out.setdefault(tuple(row[k] for k in keys), []).append(row)
    return out


def mean_std(values: Sequence[float | None]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (0 for one value) of the finite values; None when there are none."""
    finite = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not finite:
        return None, None
    return statistics.fmean(finite), (statistics.stdev(finite) if len(finite) > 1 else 0.0)


def summarize(rows: Sequence[Mapping[str, Any]], keys: Sequence[str]) -> list[dict[str, Any]]:
    """One row per group of `keys`: mean and spread over the seeds."""
    out = []
    for values, members in group(rows, keys).items():
        acc, acc_sd = mean_std([r["final_accuracy"] for r in members])
        best, _ = mean_std([r["best_accuracy"] for r in members])
        f1, f1_sd = mean_std([r["final_f1_macro"] for r in members])
        eps, _ = mean_std([r["epsilon"] for r in members])
        reached = [r["rounds_to_target"] for r in members if r["rounds_to_target"] is not None]
        spread = [r["client_accuracy_max"] - r["client_accuracy_min"] for r in members
                  if r["client_accuracy_min"] is not None]
        out.append({**dict(zip(keys, values, strict=True)), "seeds": len(members),
                    "final_accuracy_mean": acc, "final_accuracy_std": acc_sd, "best_accuracy_mean": best,
                    "final_f1_macro_mean": f1, "final_f1_macro_std": f1_sd, "epsilon_mean": eps,
                    "reached_target": len(reached),
                    "rounds_to_target_mean": statistics.fmean(reached) if reached else None,
                    "client_spread_mean": statistics.fmean(spread) if spread else None,
                    "seconds_mean": statistics.fmean(r["seconds"] for r in members)})
    return out


# ------------------------------------------------------------------------------------------------ figures


def _colours(names: Sequence[str]) -> dict[str, Any]:
    from matplotlib import colormaps

    palette = colormaps["tab10"].colors
    return {name: palette[i % len(palette)] for i, name in enumerate(names)}


def plot_accuracy_vs_work(rows: Sequence[Mapping[str, Any]], outcomes: Mapping[str, RunOutcome],
                          privacy_levels: Sequence[str]) -> bytes:
    fig, ax = new_axes("Server test accuracy against work (mean over seeds, band: min-max)",
                       "passes over the training data (federated: rounds x local epochs; "
                       "centralized: epochs)",
                       "test accuracy", size=(7.5, 4.6))
    settings = list(dict.fromkeys(r["series"] for r in rows))
    colours = _colours(settings)
    for (setting, privacy), members in group(rows, ("series", "privacy")).items():
        runs = [outcomes[r["run_dir"]] for r in members]
        length = min(len(o.accuracy) for o in runs)
        x = [statistics.fmean(o.passes[i] for o in runs) for i in range(length)]
        per_round = [[o.accuracy[i] for o in runs] for i in range(length)]
        style = LINESTYLES[privacy_levels.index(privacy) % len(LINESTYLES)]
        ax.plot(x, [statistics.fmean(v) for v in per_round], linestyle=style, marker="o", markersize=3,
                color=colours[setting], label=f"{setting}, {privacy}")
        if len(runs) > 1:
            ax.fill_between(x, [min(v) for v in per_round], [max(v) for v in per_round],
                            color=colours[setting], alpha=0.12, linewidth=0)
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7, loc="lower right")
    return png_bytes(fig)


def plot_accuracy_vs_epsilon(summary: Sequence[Mapping[str, Any]], privacy_levels: Sequence[str]) -> bytes:
    """Categorical x axis: the target epsilons from strongest to weakest privacy, then no DP (epsilon -> inf).
    The measured epsilons (in the tables) meet their targets, so the targets place the points."""
    levels = sorted((p for p in privacy_levels if p != NO_DP), key=lambda p: _target_of(summary, p))
    levels += [NO_DP] if NO_DP in privacy_levels else []
    fig, ax = new_axes("Privacy-utility: final accuracy against target epsilon (mean ± sd over seeds)",
                       "target epsilon (delta as configured; no DP = infinity)", "final test accuracy")
    settings = list(dict.fromkeys(s["series"] for s in summary))
    colours = _colours(settings)
    for setting in settings:
        points = [(levels.index(s["privacy"]), s) for s in summary
                  if s["series"] == setting and s["final_accuracy_mean"] is not None]
        points.sort(key=lambda p: p[0])
        ax.errorbar([x for x, _ in points], [s["final_accuracy_mean"] for _, s in points],
                    yerr=[s["final_accuracy_std"] for _, s in points], marker="o", capsize=3,
                    color=colours[setting], label=setting)
    labels = [f"{_target_of(summary, p):g}" if p != NO_DP else "no DP" for p in levels]
    ax.set_xticks(list(range(len(levels))), labels)
    ax.set_xlim(-0.5, len(levels) - 0.5)
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7, loc="lower right")
    return png_bytes(fig)


def _target_of(summary: Sequence[Mapping[str, Any]], privacy: str) -> float:
    return float(next(s["target_epsilon"] for s in summary if s["privacy"] == privacy))


def plot_accuracy_vs_alpha(summary: Sequence[Mapping[str, Any]], rows: Sequence[Mapping[str, Any]],
                           privacy_levels: Sequence[str]) -> bytes:
    """Categorical x axis: each Dirichlet alpha (more skew to the left), then IID (alpha -> infinity)."""
    alphas = sorted({r["alpha"] for r in rows if r["alpha"] is not None})
    positions = {a: i for i, a in enumerate(alphas)}
    iid_at = len(alphas)
    fig, ax = new_axes("Final accuracy against label skew (Dirichlet alpha; mean ± sd over seeds)",
                       "Dirichlet alpha (smaller = more skew)", "final test accuracy")
    lines = [(arm, privacy) for arm in dict.fromkeys(r["arm"] for r in rows) for privacy in privacy_levels]
    colours = _colours([f"{arm} {privacy}" for arm, privacy in lines])
    by_partition = {r["setting"]: r for r in rows}
    for arm, privacy in lines:
        colour, name = colours[f"{arm} {privacy}"], f"{arm}: {privacy}" if arm else privacy
        points = []
        for s in summary:
            if s["arm"] != arm or s["privacy"] != privacy or s["final_accuracy_mean"] is None:
                continue
            first = by_partition[s["setting"]]
            if first["alpha"] is not None:
                points.append((positions[first["alpha"]], s))
            elif first["partition"] and parse_partition(first["partition"]).kind == "iid":
                points.append((iid_at, s))
            elif s["setting"] == CENTRALIZED:
                ax.axhline(s["final_accuracy_mean"], linestyle=":", color=colour, label=f"centralized, {name}")
        points.sort(key=lambda p: p[0])
        if points:
            ax.errorbar([p for p, _ in points], [s["final_accuracy_mean"] for _, s in points],
                        yerr=[s["final_accuracy_std"] for _, s in points], marker="o", capsize=3,
                        color=colour, label=f"federated, {name}")
    ax.set_xticks(list(range(iid_at + 1)), [f"{a:g}" for a in alphas] + ["IID"])
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7, loc="lower right")
    return png_bytes(fig)


def plot_client_spread(rows: Sequence[Mapping[str, Any]], outcomes: Mapping[str, RunOutcome]) -> bytes:
    groups = [(k, v) for k, v in group(rows, ("series", "privacy")).items() if v[0]["setting"] != CENTRALIZED]
    width = max(6.0, 0.9 * len(groups) + 2)
    fig, ax = new_axes("Final model on each client's held-out split (all seeds)", "", "accuracy",
                       size=(width, 4.6))
    data = [[a for r in members for a in outcomes[r["run_dir"]].client_accuracy] for _, members in groups]
    labels = [f"{setting.replace('federated ', '')}\n{privacy}" for (setting, privacy), _ in groups]
    if groups:
        ax.boxplot(data, tick_labels=labels)
        server = [statistics.fmean(r["final_accuracy"] for r in members) for _, members in groups]
        ax.scatter(range(1, len(groups) + 1), server, marker="D", color="tab:red", zorder=3,
                   label="server test set (mean)")
        ax.legend(fontsize=7, loc="lower right")
        ax.tick_params(axis="x", labelsize=7)
    ax.set_ylim(0, 1)
    return png_bytes(fig)


# ------------------------------------------------------------------------------------------------ report


def _f(value: Any, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _n(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def _pm(mean: float | None, sd: float | None) -> str:
    return "-" if mean is None else f"{mean:.4f} ± {sd:.4f}"


def _model_parameters(run_dir: Path) -> int | None:
    import torch

    path = run_dir / "model.pt"
    if not path.is_file():
        return None
    return sum(int(t.numel()) for t in torch.load(path, weights_only=True).values())


def compute_paragraphs(rows: Sequence[Row], outcomes: Mapping[str, RunOutcome], out: Path) -> list[str]:
    """How the compute budgets of the centralized and federated cells compare, from the records."""
    central = next((r for r in rows if r["setting"] == CENTRALIZED and r["privacy"] == NO_DP), None) or next(
        (r for r in rows if r["setting"] == CENTRALIZED), None)
    federated = [r for r in rows if central is not None and r["setting"] != CENTRALIZED
                 and r["privacy"] == central["privacy"] and r["seed"] == central["seed"]
                 and r["arm"] == central["arm"]]
    federated.sort(key=lambda r: r["partition"] != "iid")  # IID first: the like-for-like comparison
    if central is None or not federated:
        return ["The grid lacks a centralized or a federated cell, so compute budgets are not compared."]
    fed = federated[0]
    params = _model_parameters(out / fed["run_dir"])
    rounds = fed["rounds"]
    c_passes, f_passes = outcomes[central["run_dir"]].passes[-1], outcomes[fed["run_dir"]].passes[-1]
    c_steps, f_steps = central["sgd_steps"] / central["rounds"], fed["sgd_steps"] / rounds
    extra = f_steps - c_steps
    steps_note = ("as many as centralized" if abs(extra) < 0.5 else
                  f"{extra:.0f} more than centralized: each client's last batch is partial" if extra > 0 else
                  f"{-extra:.0f} fewer than centralized")
    text = [
        f"Same work per example: the centralized run made {c_passes:.2f} passes over its "
        f"{central['train_examples']} training examples ({central['rounds']} epochs) and {fed['setting']} "
        f"{f_passes:.2f} passes over its clients' {fed['train_examples']} ({rounds} rounds), with the same "
        f"model, optimizer, learning rate and batch size (privacy {central['privacy']}, seed "
        f"{central['seed']}). Per round or epoch, the centralized run took {c_steps:.0f} SGD steps, all "
        f"sequential; the federated clients took {f_steps:.0f} in total ({steps_note}), at most "
        f"{fed['max_client_steps_per_round']} of them sequential on one client, since clients train in "
        f"parallel. The compute is the same; the federated model sees each client's data only through one "
        f"averaged update a round.",
    ]
    if params:
        per_round = 2 * fed["num_clients"] * params * 4
        text.append(
            f"Communication: the model has {params:,} parameters ({params * 4 / 1e6:.2f} MB as float32); "
            f"each federated round sends it to and back from {fed['num_clients']} clients, "
            f"{per_round / 1e6:.1f} MB a round and {per_round * rounds / 1e6:.1f} MB over {rounds} rounds. "
            f"The centralized run communicates no model but needs every example moved to one place.")
    text.append(
        "Wall-clock seconds in the table are measured in this simulation, where clients train one after "
        "another on one machine, so they measure total compute (plus per-round evaluation), not the time a "
        "deployment with parallel clients would take. DP-SGD costs more per step (per-example clipping).")
    return text


def build_blocks(config: CompareConfig, rows: Sequence[Row], summary: Sequence[Row],
                 outcomes: Mapping[str, RunOutcome], out: Path) -> tuple[list[Block], str]:
    run = next((r for r in rows if r["setting"] != CENTRALIZED), rows[0])
    cfg = tomllib.loads((outcomes[run["run_dir"]].run_dir / "config.toml").read_text())
    privacy_levels = list(dict.fromkeys(r["privacy"] for r in rows))
    seeds = len({r["seed"] for r in rows})
    title = f"Federated against centralized: {cfg['dataset']} / " + (
        " against ".join(config.arms) if config.arms else str(cfg["model"]))
    subset = ""
    if config.max_train_examples or config.max_test_examples:
        subset = (f" Data: a seeded, class-stratified subset ({config.max_train_examples or 'all'} training "
                  f"and {config.max_test_examples or 'all'} test examples), the same for every cell.")
    blocks: list[Block] = [
        Heading(1, title),
        Para(f"Grid from {config.source}: {_n(len(rows), 'cell')} ({_n(seeds, 'seed')}). " + (
             f"Arms: {', '.join(config.arms)}, each over the whole grid with its own settings (below). "
             if config.arms else
             f"Federated runs: {_n(cfg['num-clients'], 'client')}, {_n(run['rounds'], 'round')} of "
             f"{_n(cfg['local-epochs'], 'local epoch')}, strategy {cfg['strategy']}, optimizer "
             f"{cfg['optimizer']} (lr {cfg['learning-rate']}), batch size {cfg['batch-size']}. ") +
             "Every number below is read from the cells' records under runs/; accuracy is the server's test "
             f"set after the last round.{subset}"),
        Para("The centralized baseline is the same ServerApp and ClientApp with one client that holds the "
             "union of all clients' data; DP cells use sample-level DP-SGD (Opacus) calibrated per client "
             "for the target epsilon over all rounds, with the same clipping norm and delta for the "
             "centralized run, so each training example has the same guarantee in every setting."),
        *([Para("DP cells, centralized and federated alike, use these run-config keys instead: "
                + ", ".join(f"{k} = {v}" for k, v in config.dp_run.items()) + ".")] if config.dp_run else []),
        *[Para(f"Arm {name} (its cells are named '{name}: ...'; the figures draw one line per arm and setting) "
               f"sets {_keys(arm)}.") for name, arm in config.arms.items()],
        Heading(2, "Summary (mean ± sd over seeds)"),
        Table(("setting", "privacy", "seeds", "final accuracy", "best accuracy", "macro F1", "epsilon",
               f"reached {config.target_accuracy:g}", "rounds to reach", "client spread", "seconds"),
              tuple((s["series"], s["privacy"], str(s["seeds"]),
                     _pm(s["final_accuracy_mean"], s["final_accuracy_std"]), _f(s["best_accuracy_mean"]),
                     _pm(s["final_f1_macro_mean"], s["final_f1_macro_std"]), _f(s["epsilon_mean"], 2),
                     f"{s['reached_target']}/{s['seeds']}", _f(s["rounds_to_target_mean"], 1),
                     _f(s["client_spread_mean"], 3), _f(s["seconds_mean"], 1)) for s in summary)),
        Para("client spread: the largest minus the smallest accuracy of the final model on the clients' "
             "held-out splits. rounds to reach: rounds (centralized: epochs) until the server accuracy first "
             "reached the target, over the seeds that reached it."),
        Heading(2, "Compute budgets"),
        *[Para(t) for t in compute_paragraphs(rows, outcomes, out)],
        Heading(2, "Figures"),
        Figure(FIG_WORK, "Accuracy against passes over the training data: federated rounds and centralized "
               "epochs on one axis of work (solid: no DP; dashed/dotted: DP).",
               plot_accuracy_vs_work(rows, outcomes, privacy_levels)),
    ]
    if any(r["epsilon"] is not None for r in rows):
        blocks.append(Figure(FIG_EPSILON, "Privacy-utility curve: final accuracy at each target epsilon (the "
                             "measured epsilon is in the tables), no DP rightmost.",
                             plot_accuracy_vs_epsilon(summary, privacy_levels)))
    else:
        blocks.append(Para("No DP cells in this grid, so there is no privacy-utility curve."))
    if any(r["alpha"] is not None for r in rows):
        blocks.append(Figure(FIG_ALPHA, "Final accuracy against Dirichlet alpha (label skew); IID is "
                             "alpha -> infinity; dotted: centralized.",
                             plot_accuracy_vs_alpha(summary, rows, privacy_levels)))
    else:
        blocks.append(Para("No Dirichlet partitions in this grid, so there is no accuracy-against-skew "
                           "figure."))
    if any(r["setting"] != CENTRALIZED for r in rows):
        blocks.append(Figure(FIG_SPREAD, "Per-client accuracy spread of the final global model on each "
                             "client's held-out split, per federated setting.",
                             plot_client_spread(rows, outcomes)))
    dp_reports = [r["run_dir"] + "/report.html" for r in rows if r["epsilon"] is not None]
    if dp_reports:
        blocks += [Heading(2, "Privacy reports"),
                   Para("Each DP cell has its own privacy report (per-client epsilon, accountant, checks):"),
                   Bullets(tuple(dp_reports))]
    problems = [r for r in rows if r["dropped_updates"] or r["refused_updates"]]
    if problems:
        blocks.append(Bullets(tuple(f"{r['run_dir']}: {r['dropped_updates']} updates dropped, "
                                    f"{r['refused_updates']} refused by a budget guard (see its metrics.json)"
                                    for r in problems)))
    blocks += [
        Heading(2, "Every cell"),
        Table(("setting", "privacy", "seed", "final acc", "best acc (round)", "macro F1", "rounds to reach",
               "epsilon", "client acc min-max", "examples", "SGD steps", "seconds", "run"),
              tuple((r["series"], r["privacy"], str(r["seed"]), _f(r["final_accuracy"]),
                     f"{_f(r['best_accuracy'])} ({r['best_round']})", _f(r["final_f1_macro"]),
                     _f(r["rounds_to_target"]), _f(r["epsilon"], 2),
                     f"{_f(r['client_accuracy_min'], 3)}-{_f(r['client_accuracy_max'], 3)}",
                     str(r["train_examples"]), str(r["sgd_steps"]), _f(r["seconds"], 1), r["run_dir"])
                    for r in rows)),
        Para("Caveats: the seeds vary partition, initialisation, client sampling and batch order; with few "
             "seeds the spread is a rough guide, not a confidence interval. Hyperparameters are the grid's "
             "fixed settings, not tuned per cell; tuning them on the same data would spend privacy too "
             "(see `fedpriv sweep`)."),
    ]
    return blocks, title


def _keys(arm: Mapping[str, Any]) -> str:
    """An arm's overrides in words: its own keys, then those for its DP and its centralized cells."""
    own = ", ".join(f"{k} = {v}" for k, v in arm.items() if k not in ARM_TABLES) or "nothing of its own"
    parts = [own] + [f"for its {t.replace('-run', '')} cells " + ", ".join(f"{k} = {v}" for k, v in arm[t].items())
                     for t in ARM_TABLES if arm.get(t)]
    return "; ".join(parts)


def _clean(value: Any) -> Any:
    """JSON has no NaN: an undefined number is written as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def write_comparison(config: CompareConfig, cells: Sequence[Cell], out: Path) -> dict[str, Path]:
    """comparison.{csv,json,md,html} and the figures in `out`; returns their paths by kind."""
    outcomes: dict[str, RunOutcome] = {}
    rows = []
    for cell in cells:
        outcome = read_outcome(cell.run_dir, config.target_accuracy)
        row = cell_row(cell, outcome, out, config.target_accuracy)
        outcomes[row["run_dir"]] = outcome
        rows.append(row)
    # Table order: settings in grid order, privacy levels in grid order, then seeds.
    summary = summarize(rows, ("arm", "series", "setting", "privacy", "target_epsilon"))
    files = {"csv": out / "comparison.csv", "json": out / "comparison.json"}
    write_atomic(files["csv"], rows_csv(rows, COLUMNS).encode("utf-8"))
    document = _clean({"config": config.as_toml_dict(), "columns": list(COLUMNS), "rows": rows,
                       "summary": summary})
    write_atomic(files["json"], (json.dumps(document, indent=1, allow_nan=False) + "\n").encode("utf-8"))
    blocks, title = build_blocks(config, rows, summary, outcomes, out)
    files["md"], files["html"] = write_documents(out, "comparison", blocks, title)
    for block in blocks:
        if isinstance(block, Figure):
            files[block.filename.removesuffix(".png")] = out / block.filename
    # A federated DP cell's report shows the most: one epsilon per client.
    private = sorted((r for r in rows if r["epsilon"] is not None), key=lambda r: r["setting"] == CENTRALIZED)
    if private:
        files["privacy_report"] = out / private[0]["run_dir"] / "report.html"
    return files
