"""cProfile of one federated workload on the in-process engine, timed in CPU seconds of this process
(`time.process_time`), so that a busy shared machine changes the figures less than wall-clock timing would.

    python -m benchmarks.engine_profile --workload B --rounds 20 --out /tmp/b.prof --top 25

Workload B (issue 12): Fashion-MNIST, mlp, 1000 clients (54 train + 6 held-out each), 50 train and 50
evaluate a round. Start-up (imports, argument parsing, partitioning) is inside the profile, as a user sees it.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import tempfile
import time

WORKLOADS = {
    "B": ["--dataset", "fashion-mnist", "--model", "mlp", "--num-clients", "1000", "--fraction-train", "0.05",
          "--fraction-evaluate", "0.05"],
    "C": ["--dataset", "fashion-mnist", "--model", "mlp", "--num-clients", "1000", "--fraction-train", "0.05",
          "--fraction-evaluate", "0.05", "--dp", "user", "--user-noise-multiplier", "1.0",
          "--user-clipping-norm", "1.0", "--client-sampling", "poisson"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", choices=sorted(WORKLOADS), default="B")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--out", default=None, help="where to keep the raw profile (pstats format)")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("extra", nargs="*", help="more `fedpriv simulate` flags, after --")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        argv = ["simulate", *WORKLOADS[args.workload], "--rounds", str(args.rounds), "--out", tmp, *args.extra]
        profiler = cProfile.Profile(time.process_time)
        wall = time.perf_counter()
        profiler.enable()
        from simulations.cli import main as cli_main

        code = cli_main(argv)
        profiler.disable()
        wall = time.perf_counter() - wall
    stats = pstats.Stats(profiler, stream=sys.stdout)
    if args.out:
        stats.dump_stats(args.out)
    print(f"exit {code}; wall {wall:.1f} s; profiled CPU {stats.total_tt:.1f} s")
    stats.sort_stats("cumulative").print_stats(args.top)
    stats.sort_stats("tottime").print_stats(args.top)


if __name__ == "__main__":
    main()
