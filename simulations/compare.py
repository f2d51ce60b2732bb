"""`fedpriv compare`: federated against centralized training, with and without DP, over data skew and seeds.

The grid: the centralized baseline and one federated setting per partition (iid, dirichlet:ALPHA, natural),
each without DP and with sample-level DP-SGD at every target epsilon, each for every seed. Every cell is one
ordinary run folder under OUT/runs/; a finished cell is kept, so an interrupted comparison goes on where it
stopped. The outputs (comparison.csv/.json/.md/.html and the figures) are rebuilt from the records each time.

A grid comes from a TOML file (`--config`) or a preset (simulations/presets/NAME.toml):

    [compare]
    seeds = [1, 2]
    centralized = true
    partitions = ["iid", "dirichlet:1.0", "dirichlet:0.1"]
    target-epsilons = [8.0]        # sample-level DP cells; [] for none
    no-dp = true                   # also the cells without DP
    target-accuracy = 0.75         # for "rounds to reach" in the table
    max-train-examples = 6000      # 0 = all; a seeded stratified subset (fashion-mnist)
    max-test-examples = 2000

    [run]                          # run-config keys every cell shares (see `fedpriv simulate`)
    dataset = "fashion-mnist"
    model = "cnn"
    num-clients = 10
    num-rounds = 5

    [dp-run]                       # optional: keys for the DP cells only (centralized and federated alike)
    batch-size = 256

    [arms.recipe]                  # optional: named variants, each run over the whole grid (e.g. two models);
    model = "scatter-linear"       # keys over [run] (and [dp-run]) for this arm's cells
    [arms.recipe.dp-run]           # over that, for the arm's DP cells
    learning-rate = 16.0
    [arms.recipe.centralized]      # over all of that, for the arm's centralized cells
    batch-size = 8192
"""

from __future__ import annotations

import argparse
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from common import ConfigError, DataConfig, TrainConfig, parse_partition
from privacy import DPConfig
from server import ServerConfig
from simulations.cells import RUNS, Cell, GridResult, cell_folder_name, run_grid
from simulations.centralized import centralized_run
from simulations.runconfig import resolve
from simulations.subsets import subset_data_dir

PRESETS = ("quick", "full", "shakespeare", "privacy-utility")
CENTRALIZED = "centralized"
NO_DP = "none"
# Keys the grid sets per cell; in [run] they would be silently overridden, so they are refused there.
GRID_KEYS = {"partition": "partitions", "seed": "seeds", "dp": "target-epsilons",
             "target-epsilon": "target-epsilons", "noise-multiplier": "target-epsilons", "out-dir": "--out",
             "resume-from": "(nothing: unfinished cells are rerun)"}
ARM_TABLES = ("dp-run", "centralized")  # sub-tables an arm may hold besides its own run-config keys
_COMPARE_KEYS = ("seeds", "centralized", "partitions", "target-epsilons", "no-dp", "target-accuracy",
                 "max-train-examples", "max-test-examples")


@dataclass(frozen=True)
class CompareConfig:
    """One comparison grid, validated at construction (one-line ConfigError naming the key and the fix)."""

    run: Mapping[str, Any]
    dp_run: Mapping[str, Any] = field(default_factory=dict)  # run-config keys for the DP cells only
    seeds: tuple[int, ...] = (1,)
    centralized: bool = True
    partitions: tuple[str, ...] = ("iid",)
    target_epsilons: tuple[float, ...] = ()
    no_dp: bool = True
    target_accuracy: float = 0.8
    max_train_examples: int = 0
    max_test_examples: int = 0
    # Named variants run over the whole grid: {name: {run keys..., "dp-run": {...}, "centralized": {...}}}.
    # Empty: one unnamed arm, the grid as [run] and [dp-run] say.
    arms: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    source: str = ""  # the preset or file it came from, for the report

    def __post_init__(self) -> None:
        tables = [("run", self.run), ("dp-run", self.dp_run)]
        for name, arm in self.arms.items():
            if not name or cell_folder_name([name]) != name:
                raise ConfigError(f"arm name {name!r} is not allowed; use lowercase letters, digits, '-' and "
                                  "'.', e.g. [arms.plain-cnn]")
            if not isinstance(arm, Mapping) or any(not isinstance(arm.get(t, {}), Mapping) for t in ARM_TABLES):
                raise ConfigError(f"[arms.{name}] must be a table of run-config keys with optional "
                                  f"[arms.{name}.dp-run] and [arms.{name}.centralized] tables")
            tables.append((f"arms.{name}", {k: v for k, v in arm.items() if k not in ARM_TABLES}))
            tables += [(f"arms.{name}.{t}", arm.get(t, {})) for t in ARM_TABLES]
        for table, keys in tables:
            for key, where in GRID_KEYS.items():
                if key in keys:
                    raise ConfigError(f"[{table}] sets {key!r}, which the comparison sets per cell; remove "
                                      f"it and use {where} instead")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds) or min(self.seeds) < 0:
            raise ConfigError(f"seeds = {list(self.seeds)} is not allowed; give distinct integers >= 0, "
                              "e.g. seeds = [1, 2, 3]")
        if not self.partitions and not self.centralized:
            raise ConfigError("the grid is empty: partitions = [] and centralized = false; add a partition")
        for p in self.partitions:
            parse_partition(p)  # raises a one-line DataError naming the bad spec
        if len({str(parse_partition(p)) for p in self.partitions}) != len(self.partitions):
            raise ConfigError(f"partitions = {list(self.partitions)} lists one partition twice; list each "
                              "once")
        if any(not e > 0 for e in self.target_epsilons):
            raise ConfigError(f"target-epsilons = {list(self.target_epsilons)} is not allowed; each must be "
                              "> 0, e.g. [3.0, 8.0]")
        if not self.no_dp and not self.target_epsilons:
            raise ConfigError("the grid is empty: no-dp = false and target-epsilons = []; enable one of them")
        if not 0 < self.target_accuracy <= 1:
            raise ConfigError(f"target-accuracy = {self.target_accuracy} is out of range; it must be in "
                              "(0, 1]")
        for key, value in (("max-train-examples", self.max_train_examples),
                           ("max-test-examples", self.max_test_examples)):
            if value < 0:
                raise ConfigError(f"{key} = {value} is out of range; use 0 (all) or a number >= 1")

    @property
    def privacy_levels(self) -> tuple[float | None, ...]:
        """None = without DP, else a target epsilon."""
        return ((None,) if self.no_dp else ()) + tuple(self.target_epsilons)

    def as_toml_dict(self) -> dict[str, Any]:
        return {"compare": {"seeds": list(self.seeds), "centralized": self.centralized,
                            "partitions": list(self.partitions),
                            "target-epsilons": list(self.target_epsilons),
                            "no-dp": self.no_dp, "target-accuracy": self.target_accuracy,
                            "max-train-examples": self.max_train_examples,
                            "max-test-examples": self.max_test_examples},
                "run": dict(self.run), "dp-run": dict(self.dp_run),
                **({"arms": {k: dict(v) for k, v in self.arms.items()}} if self.arms else {})}


def load_compare_config(preset: str | None = None, path: str | Path | None = None,
                        seeds: Sequence[int] | None = None, data_dir: str | None = None) -> CompareConfig:
    """A preset by name or a TOML file; --seeds and --data-dir override what it says."""
    if (preset is None) == (path is None):
        raise ConfigError(f"give exactly one of --preset ({', '.join(PRESETS)}) and --config FILE.toml")
    if preset is not None:
        if preset not in PRESETS:
            raise ConfigError(f"unknown preset {preset!r}; choose one of: {', '.join(PRESETS)}")
        text = resources.files("simulations").joinpath("presets", f"{preset}.toml").read_text()
        source = f"preset {preset}"
    else:
        try:
            text = Path(path).read_text()
        except OSError:
            raise ConfigError(f"compare config {path} cannot be read; check the path given to "
                              "--config") from None
        source = str(path)
    try:
        table = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"compare config {source} is not valid TOML ({exc}); fix the file") from None
    unknown = sorted(set(table) - {"compare", "run", "dp-run", "arms"})
    grid = table.get("compare", {})
    unknown += sorted(f"compare.{k}" for k in set(grid) - set(_COMPARE_KEYS))
    if unknown:
        raise ConfigError(f"compare config {source}: unknown key {unknown[0]!r}; [compare] takes "
                          f"{', '.join(_COMPARE_KEYS)}; [run], [dp-run] and [arms.NAME] take run-config keys")
    run = dict(table.get("run", {}))
    if data_dir:
        run["data-dir"] = str(Path(data_dir).expanduser().resolve())

    def get(key: str, default: Any, kind: Callable[[Any], Any]) -> Any:
        value = grid.get(key, default)
        try:
            return kind(value)
        except (TypeError, ValueError):
            raise ConfigError(f"compare config {source}: {key} = {value!r} has the wrong type; see "
                              "simulations/presets/quick.toml for an example") from None

    return CompareConfig(
        run=run,
        dp_run=dict(table.get("dp-run", {})),
        seeds=tuple(seeds) if seeds else get("seeds", [1], lambda v: tuple(_int(x) for x in v)),
        centralized=get("centralized", True, _bool),
        partitions=get("partitions", ["iid"], lambda v: tuple(str(x) for x in _list(v))),
        target_epsilons=get("target-epsilons", [], lambda v: tuple(float(x) for x in _list(v))),
        no_dp=get("no-dp", True, _bool),
        target_accuracy=get("target-accuracy", 0.8, float),
        max_train_examples=get("max-train-examples", 0, _int),
        max_test_examples=get("max-test-examples", 0, _int),
        arms=_arms(table.get("arms", {}), source),
        source=source,
    )


def _arms(value: Any, source: str) -> dict[str, dict[str, Any]]:
    if not isinstance(value, dict) or not all(isinstance(v, dict) for v in value.values()):
        raise ConfigError(f"compare config {source}: [arms] must hold one table per arm, e.g. [arms.recipe]")
    return {str(k): dict(v) for k, v in value.items()}


def _list(value: Any) -> list[Any]:
    if not isinstance(value, list):
        raise TypeError
    return value


def _int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError
    return value


def _bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError
    return value


# ------------------------------------------------------------------------------------------- the grid


def setting_name(partition: str | None) -> str:
    return CENTRALIZED if partition is None else f"federated {parse_partition(partition)}"


def privacy_name(target_epsilon: float | None) -> str:
    return NO_DP if target_epsilon is None else f"dp eps={target_epsilon:g}"


def base_run_config(config: CompareConfig, keys: Mapping[str, Any], data_root: Path) -> dict[str, Any]:
    """The run config cells start from: defaults < `keys` ([run], plus [dp-run] for DP cells) < the subset."""
    base = resolve(None, keys)
    if config.max_train_examples or config.max_test_examples:
        base["data-dir"] = subset_data_dir(str(base["dataset"]), str(base["data-dir"]),
                                           config.max_train_examples, config.max_test_examples, data_root)
    return base


def plan_cells(config: CompareConfig, out: Path) -> list[Cell]:
    """Every cell of the grid, seed by seed and arm by arm (so the first seed's cells finish first).

    A cell's run config: defaults < [run] < [dp-run] (DP cells) < [arms.A] < [arms.A.dp-run] (DP cells) <
    [arms.A.centralized] (centralized cells), then what the grid sets (partition, seed, DP, out-dir)."""
    out = out.resolve()
    # With a natural partition in the grid the centralized baseline holds those natural clients' data.
    natural = next((p for p in config.partitions if parse_partition(p).kind == "natural"), None)
    central_partition = natural or "iid"
    settings: list[str | None] = ([None] if config.centralized else []) + list(config.partitions)
    arms: dict[str, Mapping[str, Any]] = dict(config.arms) or {"": {}}
    cells = []
    for seed in config.seeds:
        for arm_name, arm in arms.items():
            own = {k: v for k, v in arm.items() if k not in ARM_TABLES}
            # The four layered configs of this arm, (private, centralized) -> resolved keys, built once.
            bases = {(private, central): base_run_config(config, {
                **config.run, **(config.dp_run if private else {}), **own,
                **(arm.get("dp-run", {}) if private else {}), **(arm.get("centralized", {}) if central else {})},
                out / "data") for private in (False, True) for central in (False, True)}
            for partition in settings:
                for eps in config.privacy_levels:
                    labels = {"arm": arm_name, "setting": setting_name(partition), "partition": partition or "",
                              "privacy": privacy_name(eps), "target_epsilon": eps, "seed": seed}
                    name = cell_folder_name(([arm_name] if arm_name else []) + [
                        labels["setting"], "no-dp" if eps is None else f"dp-eps{eps:g}", f"seed{seed}"])
                    run = {**bases[(eps is not None, partition is None)], "seed": seed,
                           "partition": partition or central_partition, "out-dir": str(out / RUNS / name)}
                    if eps is not None:
                        run.update({"dp": "sample", "target-epsilon": float(eps), "noise-multiplier": 0.0})
                    nodes = None
                    if partition is None:
                        run, nodes = centralized_run(run, out / "data")
                    check_run_config(run)
                    cells.append(Cell(name, labels, run, nodes))
    return cells


def check_run_config(run: Mapping[str, Any]) -> None:
    """The checks that need no data, for every cell before the first one trains."""
    DataConfig.from_run_config(run)
    TrainConfig.from_run_config(run)
    ServerConfig.from_run_config(run)
    DPConfig.from_run_config(run)


@dataclass
class CompareResult:
    out: Path
    cells: list[Cell]
    grid: GridResult
    files: dict[str, Path] = field(default_factory=dict)


def compare(config: CompareConfig, out: str | Path, echo: Callable[[str], None] = print) -> CompareResult:
    """Run the unfinished cells of the grid, then write the comparison from every cell's records."""
    from simulations.comparison_report import write_comparison

    out = Path(out).expanduser().resolve()
    cells = plan_cells(config, out)
    grid = run_grid(cells, echo)
    files = write_comparison(config, cells, out)
    return CompareResult(out, cells, grid, files)


# ------------------------------------------------------------------------------------------- the command


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "compare", help="federated against centralized training, with and without DP, over skew and seeds",
        description="Run the comparison grid (centralized; federated per partition; without DP and at "
                    "each target epsilon; per seed) and write comparison.csv/.json/.md/.html with figures to "
                    "--out. Finished cells are kept: run it again to resume.")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--preset", choices=PRESETS,
                        help="quick: a few minutes on 2 cores; full: the study; privacy-utility: the plain "
                             "CNN against the DP recipe at epsilon 1/2/3/8 on all of Fashion-MNIST")
    source.add_argument("--config", metavar="FILE.toml", help="a grid: [compare] and [run] tables")
    p.add_argument("--out", required=True, help="folder for runs/ and the comparison files")
    p.add_argument("--seeds", type=int, nargs="+", metavar="SEED", help="override the grid's seeds")
    p.add_argument("--data-dir", help="folder holding the Fashion-MNIST IDX files")
    p.set_defaults(func=run_compare)


def run_compare(args: argparse.Namespace) -> int:
    from common.paths import output_dir

    output_dir(args.out, "--out")
    config = load_compare_config(args.preset, args.config, args.seeds, args.data_dir)
    result = compare(config, args.out)
    print(f"{len(result.grid.ran)} cells run, {len(result.grid.skipped)} kept from before; "
          f"records under {result.out / RUNS}")
    for key in ("csv", "json", "md", "html"):
        print(f"comparison.{key}: {result.files[key]}")
    if "privacy_report" in result.files:
        print(f"privacy report of a DP cell: {result.files['privacy_report']}")
    return 0
