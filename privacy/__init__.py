"""Privacy accounting shared by clients and server: DP histories, ledgers, budgets, records, calculator."""

from privacy.accounting import (
    ACCOUNTANTS,
    PrivacyError,
    Step,
    calibrate_noise,
    compute_epsilon,
    user_level_epsilons,
)
from privacy.budget import Budget, BudgetDecision, check_budget
from privacy.calculator import budget_answer, register, run_budget
from privacy.config import DPConfig
from privacy.ledger import PrivacyLedger
from privacy.records import (
    SCHEMA_VERSION,
    library_versions,
    read_privacy_record,
    validate_privacy_record,
    write_privacy_record,
)

__all__ = [
    "ACCOUNTANTS",
    "SCHEMA_VERSION",
    "Budget",
    "BudgetDecision",
    "DPConfig",
    "PrivacyError",
    "PrivacyLedger",
    "Step",
    "budget_answer",
    "calibrate_noise",
    "check_budget",
    "compute_epsilon",
    "library_versions",
    "read_privacy_record",
    "register",
    "run_budget",
    "user_level_epsilons",
    "validate_privacy_record",
    "write_privacy_record",
]
