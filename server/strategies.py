"""Strategy names -> Flower's own strategy classes, configured from ServerConfig.

Client sampling is done by fedpriv's round loop (seeded, by client id, resumable), so every strategy is
built to take all the clients it is handed: fraction 1.0 and a minimum of one.
"""

from __future__ import annotations

from flwr.serverapp.strategy import (
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    FedYogi,
    Krum,
    Strategy,
)

from server.config import ServerConfig

_TAKE_ALL = {"fraction_train": 1.0, "fraction_evaluate": 1.0, "min_train_nodes": 1, "min_evaluate_nodes": 1,
             "min_available_nodes": 1}


def build_strategy(cfg: ServerConfig, *, proximal_mu: float = 0.0) -> Strategy:
    name = cfg.strategy
    if name == "fedavg":
        return FedAvg(**_TAKE_ALL)
    if name == "fedavgm":
        return FedAvgM(**_TAKE_ALL, server_learning_rate=cfg.server_learning_rate, server_momentum=cfg.server_momentum)
    if name == "fedprox":
        return FedProx(**_TAKE_ALL, proximal_mu=proximal_mu)
    if name in ("fedadam", "fedyogi", "fedadagrad"):
        cls = {"fedadam": FedAdam, "fedyogi": FedYogi, "fedadagrad": FedAdagrad}[name]
        return cls(**_TAKE_ALL, eta=cfg.server_learning_rate)
    if name == "krum":
        return Krum(**_TAKE_ALL, num_malicious_nodes=cfg.krum_malicious)
    if name == "trimmed-mean":
        return FedTrimmedAvg(**_TAKE_ALL, beta=cfg.trim_beta)
    if name == "median":
        return FedMedian(**_TAKE_ALL)
    raise AssertionError(f"strategy {name!r} passed validation but has no builder")
