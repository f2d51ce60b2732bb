"""The `fedpriv` command. Each sub-command lives beside what it runs and registers itself here."""

from __future__ import annotations

import argparse
import atexit
import logging
import os
import sys


def user_errors() -> tuple[type[Exception], ...]:
    """The errors that mean "the user's input is wrong": each carries a one-line message naming the fix.
    Anything else is a bug and keeps its traceback."""
    from common import ConfigError, DataError
    from models import ModelError
    from privacy import PrivacyError
    from privacy.report import ReportError

    return (ConfigError, DataError, ModelError, PrivacyError, ReportError)


def build_parser() -> argparse.ArgumentParser:
    from client.deploy import register as register_client
    from client.split import register as register_split
    from privacy import register as register_budget
    from privacy.report import register as register_report
    from server.certs import register as register_certs
    from simulations import audit, compare, generate, simulate, sweep
    from simulations.serve import register as register_server

    parser = argparse.ArgumentParser(prog="fedpriv", description="Federated, differentially private training.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    simulate.register(sub)
    register_budget(sub)
    register_report(sub)
    audit.register(sub)
    register_certs(sub)
    register_split(sub)
    compare.register(sub)
    sweep.register(sub)
    register_server(sub)
    register_client(sub)
    generate.register(sub)
    return parser


def _log_to_stderr() -> None:
    """fedpriv's own warnings (a dropped update, a refused round) as plain lines; Flower's INFO chatter off."""
    logger = logging.getLogger("fedpriv")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("fedpriv: %(levelname)s: %(message)s"))
        logger.addHandler(handler)
        logger.propagate = False
    logger.setLevel(logging.INFO)
    logging.getLogger("flwr").setLevel(logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    _log_to_stderr()
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except user_errors() as exc:
        # Our own errors are ValueError subclasses with one-line messages naming the value and the fix.
        print(f"fedpriv {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        # A path that passed the checks but that the system refuses (a parent it cannot create, a full disk, a
        # read-only mount): one line naming it, not a traceback. Rounds already recorded stay on disk.
        where = f" {exc.filename}:" if exc.filename else ""
        print(f"fedpriv {args.command}: error:{where} {exc.strerror or exc}; check the path, its permissions and "
              "the free disk space", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"fedpriv {args.command}: interrupted; the records of every finished round are kept", file=sys.stderr)
        return 130


def run() -> None:
    """The `fedpriv` command: main(), then the process ends without Python's own teardown. Freeing the modules
    of torch, its compiler stack and Flower one by one took 0.6-0.8 s after a simulation had finished here. The
    exit handlers still run first (Ray's shutdown, logging's flush, finalizers); files are written and closed
    before main returns, and only this entry point skips the teardown: main() called from Python returns, and
    so does this under a profiler or a tracer (cProfile, coverage)."""
    code = main()
    if sys.getprofile() is not None or sys.gettrace() is not None:
        sys.exit(code)  # a profiler or coverage writes its results once the program has exited
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    run()
