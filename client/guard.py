"""The data owner's privacy: its ledger (kept across rounds and restarts) and its budget guard.

The ledger lives in Flower's `context.state` (which survives between messages of a run) and, when the node
config names a `state-dir`, in a file there too, so a restarted client process resumes its accounting.
The guard runs before any training: a round that would take the client past its own budget is refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from flwr.app import ConfigRecord, Context

from privacy import Budget, BudgetDecision, DPConfig, PrivacyLedger, Step, calibrate_noise, check_budget

STATE_KEY = "fedpriv.ledger"


def ledger_file(state_dir: str | Path, client_id: str) -> Path:
    return Path(state_dir) / f"ledger-{client_id}.json"


def load_ledger(context: Context, client_id: str) -> PrivacyLedger:
    """The file (when there is a state dir) is the record that outlives the process; context.state is the
    in-run copy. Whichever holds more rounds wins: neither ever forgets a round the other holds."""
    in_state = context.state.config_records.get(STATE_KEY)
    ledger = PrivacyLedger.from_json(str(in_state["json"])) if in_state else PrivacyLedger(owner=client_id)
    state_dir = context.node_config.get("state-dir")
    if state_dir:
        on_disk = PrivacyLedger.load(ledger_file(str(state_dir), client_id), owner=client_id)
        if len(on_disk.entries) > len(ledger.entries):
            ledger = on_disk
    return ledger


def save_ledger(context: Context, ledger: PrivacyLedger) -> None:
    context.state[STATE_KEY] = ConfigRecord({"json": ledger.to_json()})
    state_dir = context.node_config.get("state-dir")
    if state_dir:
        ledger.save(ledger_file(str(state_dir), ledger.owner))


@lru_cache(maxsize=256)
def _calibrated(target_epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str) -> float:
    # Pure and a few hundred ms with RDP: cached, since every round asks the same question again.
    return calibrate_noise(target_epsilon, delta, sample_rate, steps, accountant)


@dataclass(frozen=True)
class RoundPlan:
    step: Step
    budget: Budget | None
    decision: BudgetDecision | None  # None when the owner set no budget

    @property
    def allowed(self) -> bool:
        return self.decision is None or self.decision.allowed


def owner_budget(dp: DPConfig, context: Context) -> Budget | None:
    """The data owner's own budget (node config) wins over the run's; a target epsilon is a budget too."""
    node = context.node_config
    if float(node.get("budget-epsilon", 0) or 0) > 0:
        delta = float(node.get("budget-delta", 0) or 0) or dp.delta
        return Budget(float(node["budget-epsilon"]), delta)
    if dp.budget() is not None:
        return dp.budget()
    if dp.target_epsilon is not None:
        return Budget(dp.target_epsilon, dp.delta)
    return None


def plan_round(dp: DPConfig, num_examples: int, batch_size: int, local_epochs: int, num_rounds: int,
               ledger: PrivacyLedger, budget: Budget | None) -> RoundPlan:
    """This round's DP-SGD step. With a target epsilon the noise is calibrated once for the whole planned run
    (every round the client may be sampled for), so the composed epsilon at the end meets the target."""
    from client.dpsgd import DPPlan  # imports opacus: only DP runs get here, so others start without it

    plan = DPPlan.for_round(num_examples, batch_size, local_epochs)
    if dp.noise_multiplier is not None:
        z = dp.noise_multiplier
    else:
        z = _calibrated(float(dp.target_epsilon), dp.delta, plan.sample_rate, plan.steps * num_rounds, dp.accountant)
    step = Step(z, plan.sample_rate, plan.steps)
    decision = check_budget(ledger, step, budget, dp.accountant) if budget is not None else None
    return RoundPlan(step, budget, decision)
