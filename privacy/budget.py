"""The data owner's guard: refuse a round whose privacy cost would push the ledger past its budget."""

from __future__ import annotations

import math
from dataclasses import dataclass

from privacy.accounting import PrivacyError, Step, _as_float, check_accountant, compute_epsilon
from privacy.ledger import PrivacyLedger


@dataclass(frozen=True)
class Budget:
    """A data owner's total (epsilon, delta) allowance, composed over every round it takes part in."""

    epsilon: float
    delta: float

    def __post_init__(self) -> None:
        eps = _as_float("budget epsilon", self.epsilon)
        if not (eps > 0 and math.isfinite(eps)):
            raise PrivacyError(f"budget epsilon={self.epsilon!r} is not allowed: it must be a finite number "
                               "> 0; use e.g. 8.0")
        delta = _as_float("budget delta", self.delta)
        if not (0 < delta < 1):
            raise PrivacyError(f"budget delta={self.delta!r} is not allowed: it must be in (0, 1); use e.g. "
                               "1e-5 (below 1/number of records)")
        object.__setattr__(self, "epsilon", eps)
        object.__setattr__(self, "delta", delta)


@dataclass(frozen=True)
class BudgetDecision:
    """Whether a planned round fits the budget, with the epsilons before/after and a plain-words reason."""

    allowed: bool
    epsilon_now: float
    epsilon_after: float
    reason: str


def check_budget(ledger: PrivacyLedger, planned: Step, budget: Budget,
                 accountant: str = "rdp") -> BudgetDecision:
    """Allow `planned` only if the ledger's history plus `planned` stays within budget.epsilon at
    budget.delta. Nothing is recorded: the caller records the round once it has actually trained."""
    check_accountant(accountant)
    if not isinstance(planned, Step):
        raise PrivacyError(f"planned={planned!r} is not a Step; pass Step(noise_multiplier, sample_rate, "
                           "steps)")
    history = ledger.history()
    now = compute_epsilon(history, budget.delta, accountant)
    after = compute_epsilon([*history, planned], budget.delta, accountant)
    where = f"budget epsilon={budget.epsilon:g} at delta={budget.delta:g} ({accountant})"
    if after <= budget.epsilon:
        reason = (f"allowed: this round takes epsilon from {now:.4g} to {after:.4g}, "
                  f"within the {where}")
        return BudgetDecision(True, now, after, reason)
    reason = (f"refused: this round would take epsilon from {now:.4g} to {after:.4g}, over the {where}; "
              "skip training here, or raise the budget only if the data owner agrees")
    return BudgetDecision(False, now, after, reason)
