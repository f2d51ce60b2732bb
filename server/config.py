"""The coordinator's config: strategy, rounds, client sampling and where the records go."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from common import ConfigError

STRATEGIES = ("fedavg", "fedavgm", "fedprox", "fedadam", "fedyogi", "fedadagrad", "krum", "trimmed-mean", "median")


@dataclass(frozen=True)
class ServerConfig:
    strategy: str = "fedavg"
    num_rounds: int = 10
    fraction_train: float = 1.0
    fraction_evaluate: float = 1.0
    max_evaluate_clients: int = 0  # a cap on the clients evaluated a round; 0 = no cap
    server_learning_rate: float = 0.1
    server_momentum: float = 0.9
    trim_beta: float = 0.2
    krum_malicious: int = 0
    min_clients: int = 1
    round_timeout: float = 3600.0
    out_dir: str = "runs/latest"
    resume_from: str = ""  # a run folder whose checkpoint.pt to continue from; "" = a fresh run
    ema_decay: float = 0.0  # exponential moving average of the global model (server/ema.py); 0 = off
    seed: int = 42

    DEFAULTS: ClassVar[dict[str, Any]] = {
        "strategy": "fedavg",
        "num-rounds": 10,
        "fraction-train": 1.0,
        "fraction-evaluate": 1.0,
        "max-evaluate-clients": 0,
        "server-learning-rate": 0.1,
        "server-momentum": 0.9,
        "trim-beta": 0.2,
        "krum-malicious": 0,
        "min-clients": 1,
        "round-timeout": 3600.0,
        "out-dir": "runs/latest",
        "resume-from": "",
        "ema-decay": 0.0,
    }

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"unknown strategy {self.strategy!r}; choose one of: {', '.join(STRATEGIES)}")
        if not 0.0 < self.fraction_train <= 1.0:
            raise ConfigError(f"fraction-train = {self.fraction_train} is out of range; it must be in (0, 1]")
        if not 0.0 <= self.fraction_evaluate <= 1.0:
            raise ConfigError(f"fraction-evaluate = {self.fraction_evaluate} is out of range; it must be in [0, 1] "
                              "(0: no client evaluation, the server's test-set evaluation only)")
        if self.max_evaluate_clients < 0:
            raise ConfigError(f"max-evaluate-clients = {self.max_evaluate_clients} must be >= 0 (0 = no cap)")
        if self.num_rounds < 1:
            raise ConfigError(f"num-rounds = {self.num_rounds} is out of range; it must be >= 1")
        if not 0.0 <= self.trim_beta < 0.5:
            raise ConfigError(f"trim-beta = {self.trim_beta} is out of range; it must be in [0, 0.5)")
        if self.server_learning_rate <= 0:
            raise ConfigError(f"server-learning-rate = {self.server_learning_rate} must be > 0")
        if not 0.0 <= self.server_momentum < 1.0:
            raise ConfigError(f"server-momentum = {self.server_momentum} is out of range; it must be in [0, 1)")
        if self.ema_decay != 0.0 and not 0.0 < self.ema_decay < 1.0:
            raise ConfigError(f"ema-decay = {self.ema_decay} is out of range; it must be in (0, 1), e.g. 0.9, "
                              "or 0 to switch the moving average off")
        if self.krum_malicious < 0 or self.min_clients < 1 or self.round_timeout <= 0:
            raise ConfigError("krum-malicious must be >= 0, min-clients >= 1 and round-timeout > 0")

    @classmethod
    def from_run_config(cls, rc: Mapping[str, Any]) -> ServerConfig:
        d = {**cls.DEFAULTS, "seed": 42}

        def get(key: str, kind: type) -> Any:
            value = rc.get(key, d[key])
            try:
                return kind(value)
            except (TypeError, ValueError):
                raise ConfigError(f"{key} = {value!r} is not a {kind.__name__}") from None

        return cls(
            strategy=get("strategy", str),
            num_rounds=get("num-rounds", int),
            fraction_train=get("fraction-train", float),
            fraction_evaluate=get("fraction-evaluate", float),
            max_evaluate_clients=get("max-evaluate-clients", int),
            server_learning_rate=get("server-learning-rate", float),
            server_momentum=get("server-momentum", float),
            trim_beta=get("trim-beta", float),
            krum_malicious=get("krum-malicious", int),
            min_clients=get("min-clients", int),
            round_timeout=get("round-timeout", float),
            out_dir=get("out-dir", str),
            resume_from=get("resume-from", str),
            ema_decay=get("ema-decay", float),
            seed=get("seed", int),
        )
