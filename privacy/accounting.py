"""Privacy accounting: epsilon of a whole DP history, noise calibration, user-level curves.

A history is a list of `Step`s (noise multiplier, sample rate, steps). Epsilon is always composed over the
whole history. RDP and PLD come from Google's dp_accounting, PRV from Opacus.

Convention for `noise_multiplier` z: the Gaussian noise has standard deviation z * C, where C bounds the
norm of one unit's contribution (the clipping norm). With Poisson sampling the neighbouring relation is
add/remove-one, so the sensitivity is C. With fixed-size sampling ("m of N" without replacement) the only
analysis available is replace-one, where swapping one unit moves the sum by up to 2C: the effective noise
multiplier handed to dp_accounting is therefore z / 2. That is the sound reading of the same noise; it makes
fixed-size sampling look costlier than Poisson at the same z, which it is under this analysis.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import logging
import math
import operator
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np


class Deferred:
    """A module imported on its first attribute access. dp_accounting (with scipy) costs seconds to import,
    which every command that merely names a PrivacyError or a DPConfig, and every run without DP, would pay."""

    def __init__(self, name: str) -> None:
        self._name = name

    def __getattr__(self, attr: str) -> Any:
        return getattr(importlib.import_module(self._name), attr)


dp_accounting = Deferred("dp_accounting")
dp_pld = Deferred("dp_accounting.pld")
dp_rdp = Deferred("dp_accounting.rdp")
privacy_loss_distribution = Deferred("dp_accounting.pld.privacy_loss_distribution")
rdp_privacy_accountant = Deferred("dp_accounting.rdp.rdp_privacy_accountant")

ACCOUNTANTS = ("rdp", "prv", "pld")
SAMPLINGS = ("poisson", "fixed")

# calibrate_noise searches z in [_Z_MIN, _Z_MAX]; outside it the accountants are numerically fragile and
# no practical run needs such values.
_Z_MIN = 2.0**-7
_Z_MAX = 2.0**12
_CALIBRATION_REL_TOL = 1e-3

# PLD grid. Ten times coarser than dp_accounting's default 1e-4: every PLD evaluation (and so a PLD noise
# calibration, or a per-round curve over hundreds of rounds) gets about ten times faster. The
# discretisation is pessimistic, so the result stays an upper bound, about 0.1% looser on typical runs
# (3.687 against 3.685 for 50 rounds of 125 steps at q=0.008, z=1).
PLD_VALUE_INTERVAL = 1e-3


class PrivacyError(ValueError):
    """Bad privacy input or state; the message is one line: the value, what is allowed, the fix."""


@dataclass(frozen=True)
class Step:
    """One homogeneous stretch of a DP mechanism: `steps` sampled Gaussian releases.

    sampling="poisson": each unit joins with probability `sample_rate` (add/remove-one neighbours).
    sampling="fixed": exactly m = sample_rate * population units are drawn without replacement
    (replace-one neighbours); `population` is then required and m must be a whole number.
    """

    noise_multiplier: float
    sample_rate: float
    steps: int
    sampling: str = "poisson"
    population: int | None = None

    def __post_init__(self) -> None:
        z = _as_float("noise_multiplier", self.noise_multiplier)
        if not (z > 0 and math.isfinite(z)):
            raise PrivacyError(f"noise_multiplier={self.noise_multiplier!r} is not allowed: it must be a "
                               "finite number > 0; pass the noise multiplier the optimizer used")
        q = _as_float("sample_rate", self.sample_rate)
        if not (0 < q <= 1):
            raise PrivacyError(f"sample_rate={self.sample_rate!r} is not allowed: it must be in (0, 1]; "
                               "pass batch_size / dataset_size (or clients sampled / clients)")
        steps = _as_int("steps", self.steps)
        if steps < 0:
            raise PrivacyError(f"steps={self.steps!r} is not allowed: it must be an integer >= 0; "
                               "pass the number of noisy steps taken")
        if self.sampling not in SAMPLINGS:
            raise PrivacyError(f"sampling={self.sampling!r} is not allowed: use one of {SAMPLINGS}")
        population = self.population
        if self.sampling == "poisson":
            if population is not None:
                raise PrivacyError(f"population={population!r} is only meaningful with sampling='fixed'; "
                                   "drop it for Poisson sampling")
        else:
            if population is None:
                raise PrivacyError("sampling='fixed' needs population (N, the number of units sampled "
                                   "from); pass population=N")
            population = _as_int("population", population)
            if population < 1:
                raise PrivacyError(f"population={self.population!r} is not allowed: it must be an "
                                   "integer >= 1; pass the number of units sampled from")
            m = q * population
            if abs(m - round(m)) > 1e-6 * max(1.0, m):
                raise PrivacyError(f"sample_rate={q!r} with population={population} gives m={m:g} sampled "
                                   "units, not a whole number; pass sample_rate = m / population")
        object.__setattr__(self, "noise_multiplier", z)
        object.__setattr__(self, "sample_rate", q)
        object.__setattr__(self, "steps", steps)
        object.__setattr__(self, "population", population)

    @property
    def sample_size(self) -> int | None:
        """m for fixed-size sampling, None for Poisson."""
        if self.population is None:
            return None
        return int(round(self.sample_rate * self.population))


def _as_float(name: str, value: object) -> float:
    if isinstance(value, bool):
        raise PrivacyError(f"{name}={value!r} is not allowed: it must be a number, not a bool")
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise PrivacyError(f"{name}={value!r} is not allowed: it must be a number") from None


def _as_int(name: str, value: object) -> int:
    if isinstance(value, bool):
        raise PrivacyError(f"{name}={value!r} is not allowed: it must be an integer, not a bool")
    try:
        return operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise PrivacyError(f"{name}={value!r} is not allowed: it must be an integer") from None


def check_accountant(accountant: str) -> str:
    """Return `accountant` if it is one of ACCOUNTANTS, else raise PrivacyError."""
    if accountant not in ACCOUNTANTS:
        raise PrivacyError(f"accountant={accountant!r} is not known: use one of {', '.join(ACCOUNTANTS)}")
    return accountant


def check_delta(delta: float) -> float:
    """Return `delta` as a float if 0 < delta < 1, else raise PrivacyError."""
    d = _as_float("delta", delta)
    if not (0 < d < 1):
        raise PrivacyError(f"delta={delta!r} is not allowed: it must be in (0, 1); use e.g. 1e-5 "
                           "(below 1/number of records)")
    return d


class _DropConvergenceWarnings(logging.Filter):
    # dp_accounting logs (through absl) each fractional RDP order whose series does not converge and then
    # leaves that order out, which keeps the bound valid. At large sampling rates this fires on every
    # composition and drowns the run's log, so it is muted while we compose, and only then.
    def filter(self, record: logging.LogRecord) -> bool:
        return "failed to converge" not in record.getMessage()


@contextlib.contextmanager
def _quiet_rdp_warnings() -> Iterator[None]:
    logger = logging.getLogger("absl")
    flt = _DropConvergenceWarnings()
    logger.addFilter(flt)
    try:
        yield
    finally:
        logger.removeFilter(flt)


def _merge(history: Sequence[Step]) -> dict[tuple[float, float, str, int | None], int]:
    """Sum the steps of identical mechanisms: composition is commutative, and one self-composition of
    T steps costs the accountants far less than many short ones (PRV and PLD especially)."""
    merged: dict[tuple[float, float, str, int | None], int] = {}
    for step in history:
        if not isinstance(step, Step):
            raise PrivacyError(f"history item {step!r} is not a Step; build entries with "
                               "Step(noise_multiplier, sample_rate, steps)")
        if step.steps == 0:
            continue
        key = (step.noise_multiplier, step.sample_rate, step.sampling, step.population)
        merged[key] = merged.get(key, 0) + step.steps
    samplings = {key[2] for key in merged}
    if len(samplings) > 1:
        raise PrivacyError("history mixes poisson and fixed sampling, whose neighbouring relations "
                           "(add/remove-one vs replace-one) do not compose; keep one sampling scheme "
                           "per history")
    return merged


def _dp_event(z: float, q: float, sampling: str, population: int | None) -> dp_accounting.DpEvent:
    if sampling == "poisson":
        return dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z))
    assert population is not None
    m = int(round(q * population))
    # z / 2: replace-one sensitivity of a sum of C-clipped contributions is 2C (see module docstring).
    return dp_accounting.SampledWithoutReplacementDpEvent(population, m, dp_accounting.GaussianDpEvent(z / 2))


@functools.lru_cache(maxsize=1024)
def _rdp_one_step(z: float, q: float, sampling: str, population: int | None) -> tuple[list[float], np.ndarray]:
    acc = dp_rdp.RdpAccountant(neighboring_relation=_relation(sampling))
    with _quiet_rdp_warnings():
        acc.compose(_dp_event(z, q, sampling, population), 1)
    return acc.orders, np.asarray(acc.rdp)


def _relation(sampling: str) -> dp_accounting.NeighboringRelation:
    if sampling == "fixed":
        return dp_accounting.NeighboringRelation.REPLACE_ONE
    return dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE


def _unsupported_fixed(accountant: str) -> PrivacyError:
    return PrivacyError(f"accountant={accountant!r} cannot account fixed-size sampling (m of N without "
                        "replacement); use accountant='rdp' or Poisson sampling")


def compute_epsilon(history: Sequence[Step], delta: float, accountant: str = "rdp") -> float:
    """Epsilon at `delta` of the composition of every Step in `history` (0.0 when it is empty)."""
    check_accountant(accountant)
    delta = check_delta(delta)
    merged = _merge(history)
    if not merged:
        return 0.0
    sampling = next(iter(merged))[2]
    if sampling == "fixed" and accountant != "rdp":
        raise _unsupported_fixed(accountant)
    if accountant == "prv":
        # Imported here: opacus pulls in torch, which costs seconds at import time for callers (the
        # budget CLI, the server) that never use PRV.
        from opacus.accountants import PRVAccountant

        prv = PRVAccountant()
        prv.history = [(z, q, steps) for (z, q, _, _), steps in merged.items()]
        # Opacus evaluates both branches of np.where, so q = 1 or extreme z overflow or take log(0) on
        # values that are then discarded; those warnings are noise. A NaN result would not be: checked.
        with np.errstate(all="ignore"):
            epsilon = float(prv.get_epsilon(delta))
        if math.isnan(epsilon):
            raise PrivacyError("the PRV accountant failed numerically on this history; use accountant='rdp' "
                               "or 'pld'")
        return epsilon
    if accountant == "rdp":
        # RDP composes additively per order: T steps of one mechanism cost T times its one-step curve. The
        # curve is cached, so a server recomposing every client's ledger every round stays cheap.
        orders, total = None, None
        for (z, q, samp, population), steps in merged.items():
            orders, one_step = _rdp_one_step(z, q, samp, population)
            total = steps * one_step if total is None else total + steps * one_step
        return float(rdp_privacy_accountant.compute_epsilon(orders, total, delta)[0])
    acc: dp_accounting.PrivacyAccountant = dp_pld.PLDAccountant(value_discretization_interval=PLD_VALUE_INTERVAL)
    with _quiet_rdp_warnings():
        for (z, q, samp, population), steps in merged.items():
            acc.compose(_dp_event(z, q, samp, population), steps)
        return float(acc.get_epsilon(delta))


def calibrate_noise(target_epsilon: float, delta: float, sample_rate: float, steps: int,
                    accountant: str = "rdp", prior: Sequence[Step] = (), sampling: str = "poisson",
                    population: int | None = None) -> float:
    """Smallest noise multiplier z (to ~0.1% relative) with
    compute_epsilon(prior + [Step(z, sample_rate, steps, sampling, population)]) <= target_epsilon.

    The returned z always meets the target (it is the upper end of the final bisection bracket). The search
    covers z in [2**-7, 2**12]; if even 2**-7 meets the target, 2**-7 is returned.
    """
    target = _as_float("target_epsilon", target_epsilon)
    if not (target > 0 and math.isfinite(target)):
        raise PrivacyError(f"target_epsilon={target_epsilon!r} is not allowed: it must be a finite "
                           "number > 0; use e.g. 1.0 to 10.0")
    steps = _as_int("steps", steps)
    if steps < 1:
        raise PrivacyError(f"steps={steps!r} is not allowed for calibration: it must be >= 1; "
                           "pass the number of noisy steps planned")
    check_accountant(accountant)
    delta = check_delta(delta)
    prior = list(prior)
    Step(1.0, sample_rate, steps, sampling, population)  # validate the planned mechanism up front
    spent = compute_epsilon(prior, delta, accountant)
    if spent >= target:
        raise PrivacyError(f"target_epsilon={target:g} is unreachable: the prior history alone already "
                           f"spends epsilon={spent:.4g} at delta={delta:g}; raise the target or stop "
                           "training")

    def meets(z: float) -> bool:
        step = Step(z, sample_rate, steps, sampling, population)
        return compute_epsilon([*prior, step], delta, accountant) <= target

    # Bracket [lo, hi] with meets(hi) and not meets(lo), by doubling / halving from z = 1.
    hi = 1.0
    if meets(hi):
        lo = hi / 2
        while meets(lo):
            hi = lo
            if hi <= _Z_MIN:
                return hi
            lo = hi / 2
    else:
        lo = hi
        hi = 2.0
        while not meets(hi):
            lo = hi
            hi *= 2
            if hi > _Z_MAX:
                raise PrivacyError(f"target_epsilon={target:g} is unreachable with noise multiplier up to "
                                   f"{_Z_MAX:g} (prior spends {spent:.4g}); raise the target or plan "
                                   "fewer steps or a lower sample rate")
    while hi / lo > 1 + _CALIBRATION_REL_TOL:
        mid = math.sqrt(lo * hi)
        if meets(mid):
            hi = mid
        else:
            lo = mid
    return hi


def user_level_epsilons(noise_multiplier: float, sampling: str, rounds: int, delta: float, *,
                        num_clients: int, sample_rate: float | None = None,
                        clients_per_round: int | None = None) -> dict[str, list[float] | None]:
    """User-level (one client = one privacy unit) epsilon of DP-FedAvg after each round 1..rounds.

    Each round is one Gaussian mechanism with noise std noise_multiplier * C on the sum of C-clipped client
    updates, amplified by client sampling:
      - sampling="poisson": each client joins with probability sample_rate (or clients_per_round /
        num_clients when only that is given), add/remove-one neighbours.
      - sampling="fixed": clients_per_round = m of num_clients = N drawn without replacement (or
        m = sample_rate * N when only the rate is given), replace-one neighbours, so the effective noise
        multiplier is z / 2 (see the module docstring).

    Returns {"rdp": [eps after round 1, ...], "pld": [...] or None}. "pld" is None for fixed-size sampling:
    dp_accounting's PLD accountant has no sampling-without-replacement event, so only RDP (the subsampled
    Gaussian bound of Wang, Balle and Kasiviswanathan, 2019) is available there.
    """
    rounds = _as_int("rounds", rounds)
    if rounds < 0:
        raise PrivacyError(f"rounds={rounds!r} is not allowed: it must be an integer >= 0")
    num_clients = _as_int("num_clients", num_clients)
    if num_clients < 1:
        raise PrivacyError(f"num_clients={num_clients!r} is not allowed: it must be >= 1")
    delta = check_delta(delta)
    if sampling not in SAMPLINGS:
        raise PrivacyError(f"sampling={sampling!r} is not allowed: use one of {SAMPLINGS}")
    step = _round_step(noise_multiplier, sampling, num_clients, sample_rate, clients_per_round)
    if rounds == 0:
        return {"rdp": [], "pld": [] if sampling == "poisson" else None}
    curves = _user_level_curves(step, sampling, delta)
    curves.extend(rounds)
    return {"rdp": curves.rdp[:rounds], "pld": None if sampling == "fixed" else curves.pld[:rounds]}


class _UserLevelCurves:
    """Epsilon after rounds 1, 2, ... of one user-level setting, extended on demand. A run's privacy record
    asks for the whole curve after every round; recomputing it each time cost O(rounds) PLD compositions a
    round (116 ms a round at round 20 here), extending it costs one."""

    def __init__(self, step: Step, sampling: str, delta: float) -> None:
        self.delta, self.fixed = delta, sampling == "fixed"
        event = _dp_event(step.noise_multiplier, step.sample_rate, step.sampling, step.population)
        rdp_acc = dp_rdp.RdpAccountant(neighboring_relation=_relation(sampling))
        with _quiet_rdp_warnings():
            rdp_acc.compose(event, 1)
        # RDP composes additively per order, so r rounds cost r times the one-round curve.
        self.one_round, self.orders = rdp_acc.rdp, rdp_acc.orders
        self.rdp: list[float] = []
        self.pld: list[float] = []
        self.one = self.composed = None
        if not self.fixed:
            # The one-round PLD is built once and convolved in round by round: the accountant would rebuild it
            # on every compose, which costs most of the time. Same construction as dp_accounting's PLDAccountant.
            self.one = privacy_loss_distribution.from_gaussian_mechanism(
                standard_deviation=step.noise_multiplier, sampling_prob=step.sample_rate,
                value_discretization_interval=PLD_VALUE_INTERVAL, neighboring_relation=_relation("poisson"))

    def extend(self, rounds: int) -> None:
        for r in range(len(self.rdp) + 1, rounds + 1):
            self.rdp.append(float(rdp_privacy_accountant.compute_epsilon(self.orders, r * self.one_round,
                                                                          self.delta)[0]))
        if self.fixed:
            return
        while len(self.pld) < rounds:
            self.composed = self.one if self.composed is None else self.composed.compose(self.one)
            self.pld.append(float(self.composed.get_epsilon_for_delta(self.delta)))


@functools.lru_cache(maxsize=16)
def _user_level_curves(step: Step, sampling: str, delta: float) -> _UserLevelCurves:
    return _UserLevelCurves(step, sampling, delta)


def _round_step(z: float, sampling: str, num_clients: int, sample_rate: float | None,
                clients_per_round: int | None) -> Step:
    if sampling == "poisson":
        if sample_rate is None:
            if clients_per_round is None:
                raise PrivacyError("poisson client sampling needs sample_rate (or clients_per_round to "
                                   "derive it as clients_per_round / num_clients); pass one of them")
            m = _as_int("clients_per_round", clients_per_round)
            if not (1 <= m <= num_clients):
                raise PrivacyError(f"clients_per_round={clients_per_round!r} is not allowed: it must be in "
                                   f"[1, num_clients={num_clients}]")
            sample_rate = m / num_clients
        return Step(z, sample_rate, 1)
    if clients_per_round is None:
        if sample_rate is None:
            raise PrivacyError("fixed client sampling needs clients_per_round (m of num_clients); pass it")
        return Step(z, sample_rate, 1, "fixed", num_clients)
    m = _as_int("clients_per_round", clients_per_round)
    if not (1 <= m <= num_clients):
        raise PrivacyError(f"clients_per_round={clients_per_round!r} is not allowed: it must be in "
                           f"[1, num_clients={num_clients}]")
    if sample_rate is not None and abs(sample_rate * num_clients - m) > 1e-6 * m:
        raise PrivacyError(f"sample_rate={sample_rate!r} disagrees with clients_per_round={m} of "
                           f"num_clients={num_clients}; pass only clients_per_round")
    return Step(z, m / num_clients, 1, "fixed", num_clients)
