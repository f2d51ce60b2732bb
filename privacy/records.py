"""privacy.json: the run's privacy record, validated on write and on read against one fixed schema.

Top level: schema_version, delta, sample_level, user_level, local, library_versions (exactly these keys),
  plus, only for runs with secure aggregation, secure_aggregation: {protocol, trust_model, threshold, shares,
  bits, survivors_per_round, distributed_dp (null or the Skellam / discrete Gaussian plan and its epsilons)}.
  sample_level: null or {accountant, clients: [client, ...]}
    client: {client_id, num_examples, noise_multiplier, max_grad_norm, sample_rate, steps_per_round,
             epsilon_per_round, rounds, epsilon, budget ({epsilon, delta} or null), refused_rounds}, plus
            optionally grad_sample_mode (bk, or the Opacus mode DP-SGD fell back to)
    (steps_per_round, epsilon_per_round and rounds run over the rounds the client took part in.)
  user_level: null or {accountant, noise_multiplier, clipping_norm, client_sampling, client_sampling_rate,
                       num_clients, epsilon_per_round, epsilon, epsilon_pld, clipping}
  local: null or a free dict (Flower's LocalDpMod settings).
"""

from __future__ import annotations

import json
import math
import os
import platform
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

from privacy.accounting import ACCOUNTANTS, SAMPLINGS, PrivacyError
from privacy.files import write_atomic

SCHEMA_VERSION = 1
CLIPPINGS = ("fixed", "adaptive")

_TOP_KEYS = ("schema_version", "delta", "sample_level", "user_level", "local", "library_versions")
_SAMPLE_KEYS = ("accountant", "clients")
_CLIENT_KEYS = ("client_id", "num_examples", "noise_multiplier", "max_grad_norm", "sample_rate",
                "steps_per_round", "epsilon_per_round", "rounds", "epsilon", "budget", "refused_rounds")
_USER_KEYS = ("accountant", "noise_multiplier", "clipping_norm", "client_sampling", "client_sampling_rate",
              "num_clients", "epsilon_per_round", "epsilon", "epsilon_pld", "clipping")
# Optional top-level section of runs with secure aggregation (absent from older records, which stay valid).
_SECURE_KEYS = ("protocol", "trust_model", "threshold", "shares", "bits", "survivors_per_round", "distributed_dp")
_LIBRARIES = ("torch", "opacus", "flwr", "dp-accounting", "numpy")


def library_versions() -> dict[str, str]:
    """Versions of what decides the numbers: torch, opacus, flwr, dp-accounting, numpy, python."""
    versions: dict[str, str] = {}
    for dist in _LIBRARIES:
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = "not installed"
    versions["python"] = platform.python_version()
    return versions


def validate_privacy_record(record: Any) -> None:
    """Raise PrivacyError (one line, naming the key) unless `record` follows the privacy.json schema."""
    if isinstance(record, dict) and "secure_aggregation" in record:  # optional: runs with secagg = true
        _check_secure(record["secure_aggregation"])
        record = {k: v for k, v in record.items() if k != "secure_aggregation"}
    _exact_keys(record, _TOP_KEYS, "")
    if record["schema_version"] != SCHEMA_VERSION or isinstance(record["schema_version"], bool):
        raise PrivacyError(f"schema_version={record['schema_version']!r} is not supported: this fedpriv "
                           f"reads version {SCHEMA_VERSION}; use the fedpriv that wrote the record")
    _number(record, "delta", "", lambda v: 0 < v < 1, "a number in (0, 1)")
    sample = record["sample_level"]
    if sample is not None:
        _exact_keys(sample, _SAMPLE_KEYS, "sample_level.")
        _choice(sample, "accountant", ACCOUNTANTS, "sample_level.")
        if not isinstance(sample["clients"], list):
            raise _bad("sample_level.clients", sample["clients"], "a list of client entries")
        for i, client in enumerate(sample["clients"]):
            _check_client(client, f"sample_level.clients[{i}].")
    user = record["user_level"]
    if user is not None:
        _check_user(user, "user_level.")
    local = record["local"]
    if local is not None and not isinstance(local, dict):
        raise _bad("local", local, "null or a dict")
    libs = record["library_versions"]
    if not (isinstance(libs, dict) and all(isinstance(x, str) for kv in libs.items() for x in kv)):
        raise _bad("library_versions", libs, "a dict of name -> version strings (see library_versions())")


def write_privacy_record(path: str | os.PathLike[str], record: dict[str, Any]) -> None:
    """Validate `record` and write it as JSON, atomically and owner-only; creates parent folders."""
    validate_privacy_record(record)
    write_atomic(path, json.dumps(record, indent=2, allow_nan=False) + "\n", private=True)


def read_privacy_record(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and validate privacy.json; any problem raises PrivacyError naming the file."""
    target = Path(path)
    try:
        record = json.loads(target.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PrivacyError(f"privacy record {target} does not exist; run training with DP enabled first, "
                           "or pass the run's privacy.json") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise PrivacyError(f"privacy record {target} is not readable JSON ({' '.join(str(exc).split())}); "
                           "regenerate it by re-running the experiment") from None
    try:
        validate_privacy_record(record)
    except PrivacyError as exc:
        raise PrivacyError(f"privacy record {target}: {exc}") from None
    return record


def _check_client(client: Any, where: str) -> None:
    if isinstance(client, dict) and "grad_sample_mode" in client:  # optional: how DP-SGD took its gradients
        if not isinstance(client["grad_sample_mode"], str):
            raise _bad(where + "grad_sample_mode", client["grad_sample_mode"], "a string (bk, ghost, hooks, ...)")
        client = {k: v for k, v in client.items() if k != "grad_sample_mode"}
    _exact_keys(client, _CLIENT_KEYS, where)
    cid = client["client_id"]
    if isinstance(cid, bool) or not isinstance(cid, (str, int)):
        raise _bad(where + "client_id", cid, "a string or an integer")
    _integer(client, "num_examples", where, 0)
    _number(client, "noise_multiplier", where, lambda v: v > 0, "a number > 0")
    _number(client, "max_grad_norm", where, lambda v: v > 0, "a number > 0")
    _number(client, "sample_rate", where, lambda v: 0 < v <= 1, "a number in (0, 1]")
    _list(client, "steps_per_round", where, _is_int_at_least(0), "integers >= 0")
    _list(client, "epsilon_per_round", where, _is_number_at_least(0), "numbers >= 0")
    _list(client, "rounds", where, _is_int_at_least(0), "integers >= 0")
    lengths = {len(client[k]) for k in ("steps_per_round", "epsilon_per_round", "rounds")}
    if len(lengths) != 1:
        raise PrivacyError(f"key '{where}rounds', 'steps_per_round' and 'epsilon_per_round' must have one "
                           "entry per round the client took part in (equal lengths); fix the writer")
    _number(client, "epsilon", where, lambda v: v >= 0, "a number >= 0")
    budget = client["budget"]
    if budget is not None:
        _exact_keys(budget, ("epsilon", "delta"), where + "budget.")
        _number(budget, "epsilon", where + "budget.", lambda v: v > 0, "a number > 0")
        _number(budget, "delta", where + "budget.", lambda v: 0 < v < 1, "a number in (0, 1)")
    _list(client, "refused_rounds", where, _is_int_at_least(0), "integers >= 0")


def _check_secure(section: Any) -> None:
    where = "secure_aggregation."
    _exact_keys(section, _SECURE_KEYS, where)
    if not (isinstance(section["trust_model"], str) and section["trust_model"]):
        raise _bad(where + "trust_model", section["trust_model"], "a sentence stating the trust model")
    _integer(section, "threshold", where, 2)
    _list(section, "survivors_per_round", where, _is_int_at_least(0), "integers >= 0")
    ddp = section["distributed_dp"]
    if ddp is not None:
        if not isinstance(ddp, dict):
            raise _bad(where + "distributed_dp", ddp, "null or a dict")
        _number(ddp, "epsilon", where + "distributed_dp.", lambda v: v >= 0, "a number >= 0")


def _check_user(user: Any, where: str) -> None:
    _exact_keys(user, _USER_KEYS, where)
    _choice(user, "accountant", ACCOUNTANTS, where)
    _number(user, "noise_multiplier", where, lambda v: v > 0, "a number > 0")
    _number(user, "clipping_norm", where, lambda v: v > 0, "a number > 0")
    _choice(user, "client_sampling", SAMPLINGS, where)
    _number(user, "client_sampling_rate", where, lambda v: 0 < v <= 1, "a number in (0, 1]")
    _integer(user, "num_clients", where, 1)
    _list(user, "epsilon_per_round", where, _is_number_at_least(0), "numbers >= 0")
    _number(user, "epsilon", where, lambda v: v >= 0, "a number >= 0")
    if user["epsilon_pld"] is not None:
        _number(user, "epsilon_pld", where, lambda v: v >= 0, "null or a number >= 0")
    _choice(user, "clipping", CLIPPINGS, where)


def _bad(key: str, value: Any, allowed: str) -> PrivacyError:
    shown = repr(value)
    if len(shown) > 60:
        shown = shown[:57] + "..."
    return PrivacyError(f"key '{key}' is {shown}, but must be {allowed}; fix the code that writes "
                        "privacy.json")


def _exact_keys(obj: Any, keys: tuple[str, ...], where: str) -> None:
    name = where.rstrip(".") or "the record"
    if not isinstance(obj, dict):
        raise PrivacyError(f"{name} must be a dict with keys {list(keys)}; fix the code that writes "
                           "privacy.json")
    missing = [k for k in keys if k not in obj]
    extra = [k for k in obj if k not in keys]
    if missing or extra:
        raise PrivacyError(f"{name} has missing keys {missing} and unknown keys {extra}; the schema "
                           f"(version {SCHEMA_VERSION}) has exactly {list(keys)}")


def _is_number(v: Any) -> bool:
    return not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v)


def _is_number_at_least(low: float) -> Callable[[Any], bool]:
    return lambda v: _is_number(v) and v >= low


def _is_int_at_least(low: int) -> Callable[[Any], bool]:
    return lambda v: not isinstance(v, bool) and isinstance(v, int) and v >= low


def _number(obj: dict[str, Any], key: str, where: str, ok: Callable[[float], bool], allowed: str) -> None:
    v = obj[key]
    if not (_is_number(v) and ok(v)):
        raise _bad(where + key, v, allowed)


def _integer(obj: dict[str, Any], key: str, where: str, low: int) -> None:
    if not _is_int_at_least(low)(obj[key]):
        raise _bad(where + key, obj[key], f"an integer >= {low}")


def _choice(obj: dict[str, Any], key: str, allowed: tuple[str, ...], where: str) -> None:
    if obj[key] not in allowed:
        raise _bad(where + key, obj[key], f"one of {list(allowed)}")


def _list(obj: dict[str, Any], key: str, where: str, ok: Callable[[Any], bool], allowed: str) -> None:
    v = obj[key]
    if not isinstance(v, list):
        raise _bad(where + key, v, f"a list of {allowed}")
    for i, item in enumerate(v):
        if not ok(item):
            raise _bad(f"{where}{key}[{i}]", item, allowed)
