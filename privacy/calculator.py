"""`fedpriv budget`: epsilon for a planned DP-SGD run, or the noise multiplier that meets a target epsilon."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from privacy.accounting import ACCOUNTANTS, PrivacyError, Step, calibrate_noise, compute_epsilon

_PROG = "fedpriv budget"


def budget_answer(*, sample_rate: float, steps: int, delta: float, noise_multiplier: float | None = None,
                  target_epsilon: float | None = None, accountant: str = "rdp") -> dict[str, Any]:
    """Epsilon of `steps` Poisson-sampled steps at `noise_multiplier`, or the smallest noise multiplier
    whose epsilon meets `target_epsilon` (exactly one of the two). Returns the keys epsilon, delta,
    noise_multiplier, sample_rate, steps, accountant."""
    if (noise_multiplier is None) == (target_epsilon is None):
        raise PrivacyError("give exactly one of noise_multiplier (to get epsilon) or target_epsilon (to get "
                           "the noise multiplier); drop the other")
    if noise_multiplier is None:
        assert target_epsilon is not None
        noise_multiplier = calibrate_noise(target_epsilon, delta, sample_rate, steps, accountant)
    step = Step(noise_multiplier, sample_rate, steps)
    epsilon = compute_epsilon([step], delta, accountant)
    return {"epsilon": epsilon, "delta": float(delta), "noise_multiplier": step.noise_multiplier,
            "sample_rate": step.sample_rate, "steps": step.steps, "accountant": accountant}


def register(subparsers: Any) -> None:
    """Add the `budget` sub-command to an argparse subparsers object (sets func=run_budget)."""
    parser = subparsers.add_parser(
        "budget", help="epsilon of a DP-SGD plan, or the noise multiplier for a target epsilon",
        description="Sample-level DP budget calculator for Poisson-sampled DP-SGD.")
    parser.add_argument("--sample-rate", type=float, required=True,
                        help="probability that an example joins a batch (batch size / dataset size)")
    parser.add_argument("--steps", type=int, required=True, help="number of noisy optimizer steps")
    parser.add_argument("--delta", type=float, required=True, help="target delta, below 1/dataset size")
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--noise-multiplier", type=float, help="noise multiplier z: report epsilon")
    which.add_argument("--target-epsilon", type=float,
                       help="target epsilon: report the smallest z meeting it")
    parser.add_argument("--accountant", choices=ACCOUNTANTS, default="rdp", help="privacy accountant")
    parser.add_argument("--json", action="store_true", help="print the answer as JSON")
    parser.set_defaults(func=run_budget)


def run_budget(args: argparse.Namespace) -> int:
    """Run `fedpriv budget` for parsed `args`: print the answer, return the exit code (2: bad input)."""
    try:
        answer = budget_answer(sample_rate=args.sample_rate, steps=args.steps, delta=args.delta,
                               noise_multiplier=getattr(args, "noise_multiplier", None),
                               target_epsilon=getattr(args, "target_epsilon", None),
                               accountant=getattr(args, "accountant", "rdp"))
    except PrivacyError as exc:
        print(f"{_PROG}: error: {exc}", file=sys.stderr)
        return 2
    if getattr(args, "json", False):
        print(json.dumps(answer))
        return 0
    from rich.console import Console  # only the human output needs rich

    solved = "noise multiplier" if getattr(args, "target_epsilon", None) is not None else "epsilon"
    Console(highlight=False).print(
        f"[bold]epsilon = {answer['epsilon']:.4g}[/bold] at delta = {answer['delta']:g} with "
        f"[bold]noise multiplier {answer['noise_multiplier']:.4g}[/bold], sample rate "
        f"{answer['sample_rate']:g}, {answer['steps']} steps ({answer['accountant']} accountant; solved for "
        f"{solved})", soft_wrap=True)
    return 0
