"""Start-up of `fedpriv simulate`: seconds from the process's creation to the start of its first round
(imports, argument parsing, validation, partitioning, the server's round-0 evaluation), medians over fresh
processes.

    python -m benchmarks.startup --repeats 5 -- --dataset digits --model mlp --num-clients 10
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

# Runs in the measured process: the clock stops when the round loop is entered, and the run ends there.
PROBE = r"""
import os, sys
def since_process_start():
    # /proc/self/stat field 22: the process's start, in clock ticks after boot; /proc/uptime: now, in seconds.
    ticks = int(open("/proc/self/stat").read().rsplit(")", 1)[1].split()[19])
    return float(open("/proc/uptime").read().split()[0]) - ticks / os.sysconf("SC_CLK_TCK")
def cpu_seconds():
    return sum(os.times()[:2])  # user + system CPU of this process: what a busy machine inflates least
import server.federation
class FirstRound(Exception):
    pass
def stop(*args, **kwargs):
    print("STARTUP", since_process_start(), cpu_seconds(), flush=True)
    raise FirstRound
server.federation.run_rounds = stop
from simulations.cli import main
try:
    main(sys.argv[1:])
except FirstRound:
    pass
"""


def measure(flags: list[str]) -> tuple[float, float]:
    with tempfile.TemporaryDirectory() as tmp:
        done = subprocess.run([sys.executable, "-c", PROBE, "simulate", *flags, "--out", tmp],
                              capture_output=True, text=True, timeout=600)
    line = next((x for x in done.stdout.splitlines() if x.startswith("STARTUP")), None)
    if line is None:
        raise SystemExit(f"no first round: {done.stderr[-2000:]}")
    return float(line.split()[1]), float(line.split()[2])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("flags", nargs="*", help="fedpriv simulate flags (after --)")
    args = parser.parse_args()
    flags = args.flags or ["--dataset", "digits", "--model", "mlp", "--num-clients", "10"]
    runs = [measure(flags) for _ in range(args.repeats)]
    print(json.dumps({"flags": flags, "seconds": [round(w, 2) for w, _ in runs],
                      "median": round(statistics.median(w for w, _ in runs), 2),
                      "cpu_seconds": [round(c, 2) for _, c in runs],
                      "cpu_median": round(statistics.median(c for _, c in runs), 2), "load": os.getloadavg()}))


if __name__ == "__main__":
    main()
