"""`fedpriv split`: one data file per client from a named dataset, to try a deployment on one machine.

Each file is what a real data owner would bring: an .npz with arrays `x` and `y` that `fedpriv client --data`
reads (client.load_local_file). The split is the one `fedpriv simulate` makes for the same dataset,
partition, client count and seed, so a deployment can be compared with a simulation of the same clients.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.datasets import DataError, load_dataset
from common.partitions import parse_partition, partition_indices


@dataclass(frozen=True)
class SplitFile:
    path: Path
    examples: int
    labels: dict[int, int]  # class id -> count


def client_file_name(index: int) -> str:
    # Named like the client keys `fedpriv certs` makes (client-0.key ...), so one id ties a file to a key.
    return f"client-{index}.npz"


def split_dataset(dataset: str, num_clients: int, partition: str, out: str | Path, seed: int = 42,
                  data_dir: str | None = None, max_examples: int | None = None,
                  overwrite: bool = False) -> list[SplitFile]:
    """Write out/client-<i>.npz for i in 0..num_clients-1; returns what each file holds.

    max_examples caps each client's file at a seeded random subset of its share (for quick trials).
    """
    spec = parse_partition(partition)
    if max_examples is not None and (isinstance(max_examples, bool) or max_examples < 1):
        raise DataError(f"--max-examples {max_examples!r} is not allowed; give a number of examples >= 1")
    out = Path(out).expanduser().resolve()
    targets = [out / client_file_name(i) for i in range(num_clients)] if num_clients >= 1 else []
    clash = next((t for t in targets if t.exists()), None)
    if clash is not None and not overwrite:
        raise DataError(f"{clash} already exists; choose another --out or pass --force to replace the files")
    ds = load_dataset(dataset, data_dir)
    parts = partition_indices(ds.y_train, spec, num_clients, seed, groups=ds.groups)
    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    written: list[SplitFile] = []
    for target, idx in zip(targets, parts, strict=True):
        if max_examples is not None and len(idx) > max_examples:
            idx = np.sort(rng.choice(idx, size=max_examples, replace=False))
        x, y = ds.x_train[idx], ds.y_train[idx]
        tmp = target.with_name(f".{target.stem}.tmp.npz")
        np.savez(tmp, x=x, y=y)
        tmp.replace(target)  # a reader never sees half a file
        classes, counts = np.unique(y, return_counts=True)
        labels = {int(c): int(n) for c, n in zip(classes, counts, strict=True)}
        written.append(SplitFile(target, len(y), labels))
    return written


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("split", help="write one data file per client from a named dataset",
                              description="Split a named dataset into one .npz file (arrays x, y) per "
                                          "client, as `fedpriv simulate` splits it, to try a deployment on "
                                          "one machine.")
    p.add_argument("--dataset", required=True, help="digits | breast-cancer | fashion-mnist | shakespeare")
    p.add_argument("--num-clients", type=int, required=True)
    p.add_argument("--partition", default="iid", help="iid | dirichlet:ALPHA | pathological:K | natural")
    p.add_argument("--out", required=True, help="folder for client-0.npz, client-1.npz, ...")
    p.add_argument("--seed", type=int, default=42, help="the run's seed, for the same split as a simulation")
    p.add_argument("--data-dir", help="folder holding the dataset files (Fashion-MNIST IDX files)")
    p.add_argument("--max-examples", type=int, help="keep at most this many examples per client")
    p.add_argument("--force", action="store_true", help="replace files already in --out")
    p.set_defaults(func=run_split)


def describe(files: Sequence[SplitFile]) -> list[str]:
    lines = []
    for f in files:
        labels = " ".join(f"{c}:{n}" for c, n in f.labels.items())
        lines.append(f"  {f.path}  {f.examples} examples  labels {labels}")
    return lines


def run_split(args: argparse.Namespace) -> int:
    from common.paths import output_dir

    output_dir(args.out, "--out")
    files = split_dataset(args.dataset, args.num_clients, args.partition, args.out, args.seed, args.data_dir,
                          args.max_examples, overwrite=args.force)
    print(f"{len(files)} client files ({args.dataset}, partition {args.partition}, seed {args.seed}):")
    print("\n".join(describe(files)))
    print(f"start a client on one: fedpriv client --superlink HOST:PORT --data {files[0].path} ...")
    return 0
