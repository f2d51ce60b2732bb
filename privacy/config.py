"""DPConfig: every privacy setting of a run, parsed from a flat Flower run config (hyphenated keys).

Flower run configs cannot hold None, so 0 means "unset" for noise-multiplier, target-epsilon,
budget-epsilon and budget-delta.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from privacy.accounting import ACCOUNTANTS, SAMPLINGS, PrivacyError
from privacy.budget import Budget

MODES = ("sample", "user", "local")
# Combinations that make sense together: sample-level DP-SGD on clients may be topped up with user-level
# DP-FedAvg on the server; local DP already noises every update and is used alone.
_ALLOWED_MODE_SETS = (frozenset(), frozenset({"sample"}), frozenset({"user"}), frozenset({"local"}),
                      frozenset({"sample", "user"}))
CLIPPINGS = ("fixed", "adaptive")


@dataclass(frozen=True)
class DPConfig:
    """Privacy settings of a run, validated at construction."""

    modes: frozenset[str]
    max_grad_norm: float = 1.0
    noise_multiplier: float | None = None
    target_epsilon: float | None = None
    delta: float = 1e-5
    accountant: str = "rdp"
    budget_epsilon: float | None = None
    budget_delta: float | None = None
    user_noise_multiplier: float = 1.0
    user_clipping_norm: float = 1.0
    user_clipping: str = "fixed"
    client_sampling: str = "poisson"
    local_epsilon: float = 1.0
    local_sensitivity: float = 1.0
    # Empirical audit (fedpriv audit): m canaries (0 = none), the seed they are drawn from, and the client whose
    # DP-SGD hosts the sample-level canaries.
    audit_canaries: int = 0
    audit_seed: int = 0
    audit_host: str = "0"

    DEFAULTS: ClassVar[dict[str, Any]] = {
        "dp": "none",
        "max-grad-norm": 1.0,
        "noise-multiplier": 0.0,
        "target-epsilon": 0.0,
        "delta": 1e-5,
        "accountant": "rdp",
        "budget-epsilon": 0.0,
        "budget-delta": 0.0,
        "user-noise-multiplier": 1.0,
        "user-clipping-norm": 1.0,
        "user-clipping": "fixed",
        "client-sampling": "poisson",
        "local-epsilon": 1.0,
        "local-sensitivity": 1.0,
        "audit-canaries": 0,
        "audit-seed": 0,
        "audit-host": "0",
    }

    def __post_init__(self) -> None:
        if isinstance(self.modes, str):
            raise PrivacyError(f"modes={self.modes!r} must be a set of modes, not a string; pass "
                               "frozenset({'sample'}) or use DPConfig.from_run_config({'dp': ...})")
        modes = frozenset(self.modes)
        unknown = sorted(modes - set(MODES))
        if unknown:
            raise PrivacyError(f"dp mode {unknown[0]!r} is not known: use none, sample, user, local or "
                               "sample,user")
        if modes not in _ALLOWED_MODE_SETS:
            raise PrivacyError(f"dp={','.join(sorted(modes))!r} is not a supported combination: use none, "
                               "sample, user, local or sample,user")
        object.__setattr__(self, "modes", modes)
        _positive("max-grad-norm", self.max_grad_norm)
        if self.noise_multiplier is not None:
            _positive("noise-multiplier", self.noise_multiplier)
        if self.target_epsilon is not None:
            _positive("target-epsilon", self.target_epsilon)
        if "sample" in modes:
            if self.noise_multiplier is None and self.target_epsilon is None:
                raise PrivacyError("dp=sample needs noise-multiplier or target-epsilon (both are unset/0); "
                                   "set e.g. noise-multiplier=1.0 or target-epsilon=8.0")
            if self.noise_multiplier is not None and self.target_epsilon is not None:
                raise PrivacyError(f"noise-multiplier={self.noise_multiplier:g} and target-epsilon="
                                   f"{self.target_epsilon:g} are both set; set only one (the other to 0)")
        _unit_interval("delta", self.delta)
        if self.accountant not in ACCOUNTANTS:
            raise PrivacyError(f"accountant={self.accountant!r} is not known: use one of "
                               f"{', '.join(ACCOUNTANTS)}")
        if self.budget_epsilon is not None:
            _positive("budget-epsilon", self.budget_epsilon)
        if self.budget_delta is not None:
            _unit_interval("budget-delta", self.budget_delta)
        _positive("user-noise-multiplier", self.user_noise_multiplier)
        _positive("user-clipping-norm", self.user_clipping_norm)
        if self.user_clipping not in CLIPPINGS:
            raise PrivacyError(f"user-clipping={self.user_clipping!r} is not known: use one of "
                               f"{', '.join(CLIPPINGS)}")
        if self.client_sampling not in SAMPLINGS:
            raise PrivacyError(f"client-sampling={self.client_sampling!r} is not known: use one of "
                               f"{', '.join(SAMPLINGS)}")
        _positive("local-epsilon", self.local_epsilon)
        _positive("local-sensitivity", self.local_sensitivity)
        for key, value in (("audit-canaries", self.audit_canaries), ("audit-seed", self.audit_seed)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise PrivacyError(f"{key}={value!r} is not allowed: it must be an integer >= 0")
        if self.audit_canaries and not modes:
            raise PrivacyError("audit-canaries is set but dp=none: there is no mechanism to audit; set dp "
                               "(sample, user or local) or audit-canaries=0")

    @classmethod
    def from_run_config(cls, rc: Mapping[str, Any]) -> DPConfig:
        """Parse the privacy keys of a flat run config; other keys are ignored, missing ones take DEFAULTS.
        Memoized by those keys' values and types (a ClientApp parses this on every message); the result is
        frozen. A value that cannot be hashed is parsed anew."""
        items = tuple((k, type(rc[k]), rc[k]) for k in cls.DEFAULTS if k in rc)
        try:
            return _parsed(items)
        except TypeError:
            return cls._parse(rc)

    @classmethod
    def _parse(cls, rc: Mapping[str, Any]) -> DPConfig:
        v = {**cls.DEFAULTS, **{k: rc[k] for k in cls.DEFAULTS if k in rc}}
        return cls(
            modes=_parse_modes(v["dp"]),
            max_grad_norm=_num("max-grad-norm", v["max-grad-norm"]),
            noise_multiplier=_optional("noise-multiplier", v["noise-multiplier"]),
            target_epsilon=_optional("target-epsilon", v["target-epsilon"]),
            delta=_num("delta", v["delta"]),
            accountant=_text("accountant", v["accountant"]),
            budget_epsilon=_optional("budget-epsilon", v["budget-epsilon"]),
            budget_delta=_optional("budget-delta", v["budget-delta"]),
            user_noise_multiplier=_num("user-noise-multiplier", v["user-noise-multiplier"]),
            user_clipping_norm=_num("user-clipping-norm", v["user-clipping-norm"]),
            user_clipping=_text("user-clipping", v["user-clipping"]),
            client_sampling=_text("client-sampling", v["client-sampling"]),
            local_epsilon=_num("local-epsilon", v["local-epsilon"]),
            local_sensitivity=_num("local-sensitivity", v["local-sensitivity"]),
            audit_canaries=_int("audit-canaries", v["audit-canaries"]),
            audit_seed=_int("audit-seed", v["audit-seed"]),
            audit_host=str(v["audit-host"]),
        )

    def budget(self) -> Budget | None:
        """The client's guard budget, or None when budget-epsilon is unset. Its delta defaults to `delta`."""
        if self.budget_epsilon is None:
            return None
        return Budget(self.budget_epsilon, self.budget_delta if self.budget_delta is not None else self.delta)

    def warn_delta(self, n: int) -> str | None:
        """A warning when delta (or the budget's delta) is not below 1/n for a dataset of n records."""
        if n < 1:
            return None
        worst = max(self.delta, self.budget_delta or 0.0)
        if worst < 1 / n:
            return None
        return (f"delta={worst:g} is not below 1/n = {1 / n:.3g} for n={n} records: a mechanism may then "
                f"expose whole records with probability delta; set delta below {1 / n:.1g}, "
                f"e.g. {_suggest(n):g}")


def _suggest(n: int) -> float:
    # The next power of ten below 1/n, then one more decade, e.g. n=1000 -> 1e-4.
    return 10.0 ** (math.floor(math.log10(1 / n)) - 1)


@functools.lru_cache(maxsize=64)
def _parsed(items: tuple[tuple[str, type, Any], ...]) -> DPConfig:
    return DPConfig._parse({k: value for k, _, value in items})


def _parse_modes(value: Any) -> frozenset[str]:
    if not isinstance(value, str):
        raise PrivacyError(f"dp={value!r} is not allowed: use none, sample, user, local or sample,user")
    parts = [p.strip().lower() for p in value.split(",") if p.strip()]
    if parts == ["none"] or not parts:
        return frozenset()
    unknown = [p for p in parts if p not in MODES]
    if unknown:
        raise PrivacyError(f"dp mode {unknown[0]!r} (in dp={value!r}) is not known: use none, sample, user, "
                           "local or sample,user")
    return frozenset(parts)


def _num(key: str, value: Any) -> float:
    if isinstance(value, bool):
        raise PrivacyError(f"{key}={value!r} is not allowed: it must be a number")
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise PrivacyError(f"{key}={value!r} is not allowed: it must be a number") from None
    if not math.isfinite(out):
        raise PrivacyError(f"{key}={value!r} is not allowed: it must be a finite number")
    return out


def _int(key: str, value: Any) -> int:
    number = _num(key, value)
    if number != int(number):
        raise PrivacyError(f"{key}={value!r} is not allowed: it must be an integer")
    return int(number)


def _optional(key: str, value: Any) -> float | None:
    out = _num(key, value)
    return None if out == 0 else out


def _text(key: str, value: Any) -> str:
    if not isinstance(value, str):
        raise PrivacyError(f"{key}={value!r} is not allowed: it must be a string")
    return value.strip().lower()


def _positive(key: str, value: float) -> None:
    number = not isinstance(value, bool) and isinstance(value, (int, float))
    if not (number and value > 0 and math.isfinite(value)):
        raise PrivacyError(f"{key}={value!r} is not allowed: it must be a finite number > 0")


def _unit_interval(key: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0 < value < 1):
        raise PrivacyError(f"{key}={value!r} is not allowed: it must be in (0, 1); use e.g. 1e-5 "
                           "(below 1/number of records)")
