"""Statistics of an empirical privacy audit: from canary scores to an epsilon lower bound and estimates.

Pure math (numpy/scipy), no Flower, no torch. m canaries are each included in training independently with
probability 1/2; an attack scores every canary (higher = "looks included"). From the scores:

- `epsilon_lower_bound`: Steinke, Nasr and Jagielski 2023, "Privacy auditing with one (1) training run",
  Appendix D. The attack guesses "included" on the k+ highest scores and "excluded" on the k- lowest, abstains
  on the rest; r = k+ + k- guesses, v of them correct. If the mechanism is (eps, delta)-DP, then v is
  stochastically dominated by Binomial(r, e^eps / (1 + e^eps)) up to a 2*m*delta term, which gives a p-value
  for every eps; the bound is the largest eps whose p-value stays below 1 - confidence. The guess counts are
  not chosen after looking at the outcome: a fixed list of k values is tried and the p-value threshold is
  divided by their number (Bonferroni), so the maximum over them is still a valid bound.
- `gaussian_epsilon_estimate`: Andrew et al. 2024 ("One-shot empirical privacy estimation for federated
  learning"): fit one Gaussian to the scores of excluded canaries and one to those of included canaries, and
  report the epsilon at delta of the pair. It is an ESTIMATE, not a bound: it assumes Gaussian scores.
- `auroc` and `tpr_at_fpr`: how well the scores separate included from excluded canaries.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import stats

from privacy.accounting import PrivacyError

# Fractions of m tried as the number of guesses r (half on the top scores, half on the bottom). Fixed in
# advance, never chosen from the outcome; their number enters the Bonferroni correction.
GUESS_FRACTIONS = (0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
MIN_CANARIES = 10
_SEARCH_STEPS = 50


def p_value(m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """P-value of seeing >= v correct out of r guesses among m canaries if the mechanism is (eps, delta)-DP
    (Steinke et al. 2023, Proposition 5.7 / Appendix D): a Binomial(r, q) tail, q = e^eps/(1+e^eps), plus
    2*m*delta times the largest average of the tail's lower terms."""
    if not 0 <= v <= r <= m:
        raise PrivacyError(f"need 0 <= v <= r <= m, got v={v}, r={r}, m={m}")
    q = 1.0 / (1.0 + math.exp(-epsilon))
    beta = float(stats.binom.sf(v - 1, r, q))  # P[Binomial(r, q) >= v]
    if v == 0 or delta == 0:
        return min(1.0, beta)
    i = np.arange(1, v + 1)
    tails = np.cumsum(stats.binom.pmf(v - i, r, q))  # P[v > Binomial(r, q) >= v - i]
    alpha = float((tails / i).max())
    return min(1.0, beta + alpha * 2 * m * delta)


def epsilon_for(m: int, r: int, v: int, delta: float, p: float) -> float:
    """The largest epsilon whose p-value stays below p (0 when even epsilon 0 cannot be rejected)."""
    if not 0.0 < p < 1.0:
        raise PrivacyError(f"p-value threshold {p} must be in (0, 1)")
    if r == 0 or p_value(m, r, v, 0.0, delta) >= p:
        return 0.0
    low, high = 0.0, 1.0
    while p_value(m, r, v, high, delta) < p:  # p_value grows with epsilon
        low, high = high, 2 * high
        if high > 1e3:
            return low
    for _ in range(_SEARCH_STEPS):
        mid = (low + high) / 2
        if p_value(m, r, v, mid, delta) < p:
            low = mid
        else:
            high = mid
    return low


def guess_plans(m: int) -> tuple[tuple[int, int], ...]:
    """The (k+, k-) guess counts tried for m canaries: r guesses split evenly between the top and the bottom
    scores, and r guesses on the top scores only (more powerful when an included canary can go unused, e.g. a
    canary client that sampling never picked, which scores like an excluded one)."""
    plans = set()
    for f in GUESS_FRACTIONS:
        r = max(2, 2 * round(f * m / 2))
        if r <= m:
            plans.add((r // 2, r // 2))
        if r < m:  # all m on the top scores alone would guess "included" for every canary
            plans.add((r, 0))
    return tuple(sorted(plans, key=lambda kk: (kk[0] + kk[1], kk[1])))


@dataclass(frozen=True)
class Bound:
    epsilon: float
    guesses: int  # r = k+ + k- of the plan that gave the bound
    correct: int  # v
    top: int  # k+: guesses "included" on the top scores (the other r - k+ are "excluded" on the bottom)


def guesses_correct(scores: np.ndarray, included: np.ndarray, top: int, bottom: int) -> int:
    """Guess "included" on the `top` highest scores and "excluded" on the `bottom` lowest; count correct ones.
    Ties are broken by canary index (the scores' order), which does not look at inclusion."""
    order = np.argsort(scores, kind="stable")
    high, low = order[len(order) - top:] if top else order[:0], order[:bottom]
    return int(included[high].sum() + (~included[low]).sum())


def epsilon_lower_bound(scores: np.ndarray, included: np.ndarray, delta: float, confidence: float,
                        plans: tuple[tuple[int, int], ...] | None = None) -> Bound:
    """The one-run lower bound at `confidence`, the best over the pre-set guess plans (Bonferroni)."""
    scores, included = _check(scores, included)
    if not 0.0 < confidence < 1.0:
        raise PrivacyError(f"confidence {confidence} is not in (0, 1); use e.g. 0.95")
    m = len(scores)
    plans = plans or guess_plans(m)
    p = (1.0 - confidence) / len(plans)
    first = plans[0]
    best = Bound(0.0, sum(first), guesses_correct(scores, included, *first), first[0])
    for top, bottom in plans:
        r, v = top + bottom, guesses_correct(scores, included, top, bottom)
        eps = epsilon_for(m, r, v, delta, p)
        if eps > best.epsilon:
            best = Bound(eps, r, v, top)
    return best


def best_possible_bound(m: int, delta: float, confidence: float) -> float:
    """The bound m canaries can give at most: every guess correct (a mechanism with no privacy at all)."""
    plans = guess_plans(m)
    p = (1.0 - confidence) / len(plans)
    return max(epsilon_for(m, sum(kk), sum(kk), delta, p) for kk in plans)


def vacuity_problem(m: int, delta: float, confidence: float) -> str | None:
    """Why m canaries cannot give a bound at this delta, with the m to use instead; None if they can."""
    if m < MIN_CANARIES:
        return f"{m} canaries are too few for a bound; use at least {MIN_CANARIES} (e.g. --canaries 1000)"
    if 2 * m * delta < 1 and best_possible_bound(m, delta, confidence) > 0:
        return None
    suggest = m
    while suggest > MIN_CANARIES and (2 * suggest * delta >= 1
                                      or best_possible_bound(suggest, delta, confidence) == 0):
        suggest //= 2
    return (f"2*m*delta = {2 * m * delta:.3g} (m={m} canaries, delta={delta:g}) makes any bound vacuous "
            f"(0 even if every guess were right); use at most --canaries {max(suggest, MIN_CANARIES)} "
            "(or a run with a smaller delta)")


def hockey_stick(mu1: float, s1: float, mu0: float, s0: float, epsilon: float) -> float:
    """sup_S P1(S) - e^eps P0(S) for P1 = N(mu1, s1^2), P0 = N(mu0, s0^2), exactly: S is where the log
    density ratio exceeds eps, a set bounded by the roots of a quadratic."""
    # log p1 - log p0 - eps = a x^2 + b x + c
    a = 1 / (2 * s0**2) - 1 / (2 * s1**2)
    b = mu1 / s1**2 - mu0 / s0**2
    c = mu0**2 / (2 * s0**2) - mu1**2 / (2 * s1**2) + math.log(s0 / s1) - epsilon

    def mass(lo: float, hi: float) -> float:
        p1 = stats.norm.cdf(hi, mu1, s1) - stats.norm.cdf(lo, mu1, s1)
        p0 = stats.norm.cdf(hi, mu0, s0) - stats.norm.cdf(lo, mu0, s0)
        return float(p1 - math.exp(epsilon) * p0)

    if abs(a) < 1e-12 * max(1 / s0**2, 1 / s1**2):
        if b == 0:
            return max(0.0, mass(-math.inf, math.inf)) if c > 0 else 0.0
        x = -c / b
        return max(0.0, mass(x, math.inf) if b > 0 else mass(-math.inf, x))
    disc = b * b - 4 * a * c
    if disc <= 0:
        return max(0.0, mass(-math.inf, math.inf)) if a > 0 else 0.0
    r1, r2 = sorted(((-b - math.sqrt(disc)) / (2 * a), (-b + math.sqrt(disc)) / (2 * a)))
    if a > 0:  # positive outside the roots
        return max(0.0, mass(-math.inf, r1) + mass(r2, math.inf))
    return max(0.0, mass(r1, r2))


def gaussian_epsilon(mu1: float, s1: float, mu0: float, s0: float, delta: float) -> float:
    """The smallest eps such that both directions of the hockey-stick divergence are <= delta."""
    def worst(eps: float) -> float:
        return max(hockey_stick(mu1, s1, mu0, s0, eps), hockey_stick(mu0, s0, mu1, s1, eps))

    if worst(0.0) <= delta:
        return 0.0
    low, high = 0.0, 1.0
    while worst(high) > delta:
        low, high = high, 2 * high
        if high > 1e3:
            return math.inf
    for _ in range(_SEARCH_STEPS):
        mid = (low + high) / 2
        if worst(mid) > delta:
            low = mid
        else:
            high = mid
    return high


def gaussian_epsilon_estimate(scores: np.ndarray, included: np.ndarray, delta: float) -> float:
    """Andrew et al. 2024: epsilon of the two Gaussians fitted to excluded and included canaries' scores."""
    scores, included = _check(scores, included)
    ins, outs = scores[included], scores[~included]
    if len(ins) < 2 or len(outs) < 2:
        return 0.0
    s1, s0 = float(ins.std(ddof=1)), float(outs.std(ddof=1))
    if s1 == 0 or s0 == 0:
        return math.inf if ins.mean() != outs.mean() else 0.0
    return gaussian_epsilon(float(ins.mean()), s1, float(outs.mean()), s0, delta)


def auroc(scores: np.ndarray, included: np.ndarray) -> float:
    """Probability that an included canary outscores an excluded one (ties count half): Mann-Whitney U."""
    scores, included = _check(scores, included)
    n1, n0 = int(included.sum()), int((~included).sum())
    if n1 == 0 or n0 == 0:
        return 0.5
    ranks = stats.rankdata(scores)
    return float((ranks[included].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def tpr_at_fpr(scores: np.ndarray, included: np.ndarray, fpr: float = 0.01) -> float:
    """Share of included canaries scoring strictly above the threshold that at most `fpr` of the excluded
    ones exceed."""
    scores, included = _check(scores, included)
    outs, ins = np.sort(scores[~included]), scores[included]
    if len(outs) == 0 or len(ins) == 0:
        return 0.0
    allowed = math.floor(fpr * len(outs))  # excluded canaries allowed above the threshold
    threshold = outs[len(outs) - 1 - allowed]
    return float((ins > threshold).mean())


def _check(scores: np.ndarray, included: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    scores = np.asarray(scores, dtype=float)
    included = np.asarray(included, dtype=bool)
    if scores.ndim != 1 or scores.shape != included.shape:
        raise PrivacyError(f"scores {scores.shape} and inclusion flags {included.shape} must be equal-length lists")
    if not np.isfinite(scores).all():
        raise PrivacyError("canary scores hold NaN or infinity; the audited run diverged: audit a run that trains")
    return scores, included


@dataclass(frozen=True)
class AuditStats:
    canaries: int
    guesses: int
    guesses_top: int  # of the r guesses, how many were "included" on the top scores
    correct: int
    delta: float
    confidence: float
    epsilon_lower_bound: float
    epsilon_estimate: float
    auroc: float
    tpr_at_1pct_fpr: float
    best_possible_bound: float


def audit_stats(scores: np.ndarray, included: np.ndarray, delta: float, confidence: float) -> AuditStats:
    scores, included = _check(scores, included)
    m = len(scores)
    if problem := vacuity_problem(m, delta, confidence):
        raise PrivacyError(problem)
    bound = epsilon_lower_bound(scores, included, delta, confidence)
    return AuditStats(
        canaries=m, guesses=bound.guesses, guesses_top=bound.top, correct=bound.correct, delta=delta,
        confidence=confidence,
        epsilon_lower_bound=bound.epsilon, epsilon_estimate=gaussian_epsilon_estimate(scores, included, delta),
        auroc=auroc(scores, included), tpr_at_1pct_fpr=tpr_at_fpr(scores, included, 0.01),
        best_possible_bound=best_possible_bound(m, delta, confidence),
    )
