"""SecAggConfig: the secure aggregation settings of a run (flat run-config keys `secagg*`).

Read by both ends: the server runs the protocol with them, the client checks what it is asked against them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from common.config import ConfigError
from common.secagg_crypto import MAX_BITS, MIN_BITS

NOISES = ("skellam", "discrete-gaussian")  # as privacy.skellam.NOISES (client/ imports no privacy math here)


@dataclass(frozen=True)
class SecAggConfig:
    enabled: bool = False
    shares: int = 0  # share holders per client, itself included; 0 = every sampled client (complete graph)
    threshold: int = 0  # 0 = a majority of each client's share holders (at least 2)
    bits: int = 32  # the ring Z_{2^bits} the masked vectors live in
    clip_range: float = 8.0  # plain SecAgg: each update coordinate is clipped to +-clip_range before quantizing
    stage_timeout: float = 600.0  # seconds each of the four stages waits for replies
    noise: str = "skellam"  # distributed DP's integer noise: "skellam" or "discrete-gaussian"

    DEFAULTS: ClassVar[dict[str, Any]] = {
        "secagg": False,
        "secagg-shares": 0,
        "secagg-threshold": 0,
        "secagg-bits": 32,
        "secagg-clip-range": 8.0,
        "secagg-stage-timeout": 600.0,
        "secagg-noise": "skellam",
    }

    def __post_init__(self) -> None:
        if self.shares < 0 or self.shares == 1 or self.shares == 2:
            raise ConfigError(f"secagg-shares = {self.shares} is out of range; use 0 (every sampled client) or >= 3")
        if self.threshold != 0 and self.threshold < 2:
            raise ConfigError(f"secagg-threshold = {self.threshold} is below 2: one share would reveal a secret; "
                              "use 0 (a majority) or a value >= 2")
        if self.shares and self.threshold > self.shares:
            raise ConfigError(f"secagg-threshold = {self.threshold} is above secagg-shares = {self.shares}: no "
                              "secret could be rebuilt; lower the threshold or raise the shares")
        if not MIN_BITS <= self.bits <= MAX_BITS:
            raise ConfigError(f"secagg-bits = {self.bits} is out of range; it must be in {MIN_BITS}..{MAX_BITS}")
        if not (self.clip_range > 0 and math.isfinite(self.clip_range)):
            raise ConfigError(f"secagg-clip-range = {self.clip_range} must be a finite number > 0")
        if not self.stage_timeout > 0:
            raise ConfigError(f"secagg-stage-timeout = {self.stage_timeout} must be > 0")
        if self.noise not in NOISES:
            raise ConfigError(f"secagg-noise = {self.noise!r} is not one of {', '.join(NOISES)}; distributed DP "
                              "adds Skellam or discrete Gaussian integer noise")

    def holders(self, sampled: int) -> int:
        """Share holders per client when `sampled` clients take part (the graph is complete below `shares`)."""
        if self.shares == 0 or self.shares >= sampled:
            return sampled
        return 2 * max(1, (self.shares - 1) // 2) + 1

    def threshold_for(self, sampled: int) -> int:
        """The threshold in force with `sampled` clients; ConfigError when they cannot meet it."""
        holders = self.holders(sampled)
        t = self.threshold or max(2, holders // 2 + 1)
        if t > holders:
            raise ConfigError(f"secagg-threshold = {t} is above the {holders} share holders a client has with "
                              f"{sampled} clients sampled; lower secagg-threshold or sample more clients")
        return t

    @classmethod
    def from_run_config(cls, rc: Mapping[str, Any]) -> SecAggConfig:
        d = cls.DEFAULTS

        def get(key: str, kind: type) -> Any:
            value = rc.get(key, d[key])
            if kind is bool:
                if isinstance(value, str) and value.lower() in ("true", "false"):
                    return value.lower() == "true"
                if not isinstance(value, bool):
                    raise ConfigError(f"{key} = {value!r} is not true or false")
                return value
            try:
                out = kind(value)
                if kind is int and out != float(value):
                    raise ValueError
                return out
            except (TypeError, ValueError):
                raise ConfigError(f"{key} = {value!r} is not {'an integer' if kind is int else 'a number'}") from None

        return cls(enabled=get("secagg", bool), shares=get("secagg-shares", int),
                   threshold=get("secagg-threshold", int), bits=get("secagg-bits", int),
                   clip_range=get("secagg-clip-range", float), stage_timeout=get("secagg-stage-timeout", float),
                   noise=str(rc.get("secagg-noise", d["secagg-noise"])).lower())
