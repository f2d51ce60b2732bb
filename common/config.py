"""The data owner's two configs: which data (DataConfig) and how to train on it (TrainConfig).

Both are read from Flower's flat run config (hyphenated keys, as in `[tool.flwr.app.config]`), validated
once at the edge, and never read key by key elsewhere.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

T = TypeVar("T")

OPTIMIZERS = ("sgd", "adam", "adamw", "rmsprop")
# How DP-SGD takes per-example gradients: "auto" = book-keeping ("bk", one backward pass) where it covers every
# trainable layer, else Opacus; or one of them forced (Opacus' own grad-sample modes by name).
GRAD_SAMPLE_MODES = ("auto", "bk", "ghost", "hooks", "functorch", "ew")

# Training settings a user need not know: 0 (the default) means "the recommendation for this run's dataset and
# model", resolved wherever a TrainConfig is made (so a ClientApp given a raw `flwr run --run-config` agrees)
# and written resolved into the run's config.toml. Any value a user gives wins.
RECOMMENDED_KEYS = ("learning-rate", "local-epochs", "batch-size")
GENERIC: dict[str, Any] = {"learning-rate": 0.05, "local-epochs": 1, "batch-size": 64}
# By dataset, then (dataset, model); each measured (benchmarks/RESULTS.md, "Accuracy" and "Defaults").
RECOMMENDED: dict[str | tuple[str, str], dict[str, Any]] = {
    # 1797 images: ~130 training examples per client of 10, so more local work per round (0.9556 in 10 rounds)
    "digits": {"local-epochs": 5, "batch-size": 32},
    # the generic settings: 0.9014 in 10 rounds with the CNN over 10 IID clients
    "fashion-mnist": {},
    # the Shakespeare preset's LSTM settings
    "shakespeare": {"learning-rate": 0.5},
}


def recommended(dataset: str, model: str) -> dict[str, Any]:
    return {**GENERIC, **RECOMMENDED.get(dataset, {}), **RECOMMENDED.get((dataset, model), {})}


def _not_given(value: Any) -> bool:
    try:
        return float(value) == 0
    except (TypeError, ValueError):
        return False


def with_recommended(rc: Mapping[str, Any]) -> dict[str, Any]:
    """The run config with every training key left at 0 ("not given") set to its recommendation."""
    out = dict(rc)
    dataset = str(rc.get("dataset", DataConfig.DEFAULTS["dataset"]))
    model = str(rc.get("model", TrainConfig.DEFAULTS["model"]))
    for key, value in recommended(dataset, model).items():
        if _not_given(rc.get(key, 0)):
            out[key] = value
    return out


class ConfigError(ValueError):
    """A config value that cannot be used; the message names the key, the value and what is allowed."""


def parsed_once(parse: Callable[[Mapping[str, Any]], T], rc: Mapping[str, Any], keys: Iterable[str]) -> T:
    """`parse(rc)`, memoized by the values (and their types) of the keys it reads. A ClientApp parses its
    configs from the run config on every message: 5 ms of a 0.17 s round at 100 messages, for the same answer.
    The configs are frozen dataclasses, so sharing one is safe; a value that cannot be hashed is parsed anew."""
    items = tuple((key, type(rc[key]), rc[key]) for key in keys if key in rc)
    try:
        return _parse_items(parse, items)
    except TypeError:
        return parse(rc)


@functools.lru_cache(maxsize=64)
def _parse_items(parse: Callable[[Mapping[str, Any]], T], items: tuple[tuple[str, type, Any], ...]) -> T:
    return parse({key: value for key, _, value in items})


def _get(rc: Mapping[str, Any], defaults: Mapping[str, Any], key: str) -> Any:
    return rc.get(key, defaults[key])


def _positive(key: str, value: Any, *, kind: type = float, allow_zero: bool = False) -> Any:
    try:
        number = kind(value)
        if kind is int and number != float(value):
            raise ValueError
    except (TypeError, ValueError):
        raise ConfigError(f"{key} = {value!r} is not {'an integer' if kind is int else 'a number'}") from None
    if number < 0 or (number == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"{key} = {value!r} is out of range; it must be {bound}")
    return number


@dataclass(frozen=True)
class DataConfig:
    """Which data a client trains on: a named dataset split into partitions, or (deployment) its own file."""

    dataset: str = "fashion-mnist"
    data_dir: str = ""
    partition: str = "iid"
    num_clients: int = 10
    holdout_fraction: float = 0.1
    seed: int = 42
    text_max_length: int = 64  # tokens per text (vader-sentiment), [CLS] and [SEP] included; longer ones are cut
    text_stride: int = 20  # characters between training windows' starts (shakespeare); common/datasets.py

    DEFAULTS: ClassVar[dict[str, Any]] = {
        "dataset": "fashion-mnist",
        "data-dir": "",
        "partition": "iid",
        "num-clients": 10,
        "holdout-fraction": 0.1,
        "seed": 42,
        "text-max-length": 64,
        "text-stride": 20,
    }

    def __post_init__(self) -> None:
        # Imported here so that `common.config` stays importable without the data stack.
        from common.datasets import DATASETS, SEQ_LEN
        from common.partitions import parse_partition

        if self.dataset not in DATASETS:
            raise ConfigError(f"unknown dataset {self.dataset!r}; choose one of: {', '.join(DATASETS)}")
        parse_partition(self.partition)
        if self.num_clients < 1:
            raise ConfigError(f"num-clients = {self.num_clients} is out of range; it must be >= 1")
        if not 0.0 <= self.holdout_fraction < 1.0:
            raise ConfigError(f"holdout-fraction = {self.holdout_fraction} is out of range; it must be in [0, 1)")
        if not 1 <= self.text_stride <= SEQ_LEN:
            raise ConfigError(f"text-stride = {self.text_stride} is out of range; use 1 to {SEQ_LEN} (characters "
                              "between the starts of two training windows of shakespeare; 20 is the default)")

    @classmethod
    def from_run_config(cls, rc: Mapping[str, Any]) -> DataConfig:
        return parsed_once(cls._parse, rc, cls.DEFAULTS)

    @classmethod
    def _parse(cls, rc: Mapping[str, Any]) -> DataConfig:
        d = cls.DEFAULTS
        return cls(
            dataset=str(_get(rc, d, "dataset")),
            data_dir=str(_get(rc, d, "data-dir")),
            partition=str(_get(rc, d, "partition")),
            num_clients=_positive("num-clients", _get(rc, d, "num-clients"), kind=int),
            holdout_fraction=_positive("holdout-fraction", _get(rc, d, "holdout-fraction"), allow_zero=True),
            seed=_positive("seed", _get(rc, d, "seed"), kind=int, allow_zero=True),
            text_max_length=_positive("text-max-length", _get(rc, d, "text-max-length"), kind=int),
            text_stride=_positive("text-stride", _get(rc, d, "text-stride"), kind=int),
        )


@dataclass(frozen=True)
class TrainConfig:
    """Local training on one client, the same for a federated client and the centralized baseline."""

    model: str = "cnn"
    optimizer: str = "sgd"
    learning_rate: float = GENERIC["learning-rate"]
    momentum: float = 0.9
    weight_decay: float = 0.0
    local_epochs: int = GENERIC["local-epochs"]
    batch_size: int = GENERIC["batch-size"]
    proximal_mu: float = 0.0
    grad_sample_mode: str = "auto"
    device: str = "cpu"
    feature_cache_dir: str = ""  # where fixed features (scatter-* models) are cached; "" = ~/.cache/fedpriv

    DEFAULTS: ClassVar[dict[str, Any]] = {
        "model": "cnn",
        "optimizer": "sgd",
        "learning-rate": 0.0,  # 0: recommended for the dataset and model (with_recommended)
        "momentum": 0.9,
        "weight-decay": 0.0,
        "local-epochs": 0,
        "batch-size": 0,
        "proximal-mu": 0.0,
        "grad-sample-mode": "auto",
        "device": "cpu",  # auto | cpu | cuda | cuda:N: clients' training and the server's evaluation
        "feature-cache-dir": "",
    }

    def __post_init__(self) -> None:
        from models import model_names

        if self.model not in model_names():
            raise ConfigError(f"unknown model {self.model!r}; choose one of: {', '.join(model_names())}")
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"unknown optimizer {self.optimizer!r}; choose one of: {', '.join(OPTIMIZERS)}")
        from common.devices import check_device_name

        check_device_name(self.device)
        if self.momentum >= 1.0:
            raise ConfigError(f"momentum = {self.momentum} is out of range; it must be in [0, 1)")
        if self.grad_sample_mode not in GRAD_SAMPLE_MODES:
            raise ConfigError(f"unknown grad-sample-mode {self.grad_sample_mode!r}; "
                              f"choose one of: {', '.join(GRAD_SAMPLE_MODES)}")

    @classmethod
    def from_run_config(cls, rc: Mapping[str, Any]) -> TrainConfig:
        # "dataset" too: the recommended settings depend on it
        return parsed_once(cls._parse, rc, (*cls.DEFAULTS, "dataset"))

    @classmethod
    def _parse(cls, rc: Mapping[str, Any]) -> TrainConfig:
        d = cls.DEFAULTS
        rc = with_recommended({**d, **rc})
        return cls(
            model=str(_get(rc, d, "model")),
            optimizer=str(_get(rc, d, "optimizer")).lower(),
            learning_rate=_positive("learning-rate", _get(rc, d, "learning-rate")),
            momentum=_positive("momentum", _get(rc, d, "momentum"), allow_zero=True),
            weight_decay=_positive("weight-decay", _get(rc, d, "weight-decay"), allow_zero=True),
            local_epochs=_positive("local-epochs", _get(rc, d, "local-epochs"), kind=int),
            batch_size=_positive("batch-size", _get(rc, d, "batch-size"), kind=int),
            proximal_mu=_positive("proximal-mu", _get(rc, d, "proximal-mu"), allow_zero=True),
            grad_sample_mode=str(_get(rc, d, "grad-sample-mode")).lower(),
            device=str(_get(rc, d, "device")).strip().lower(),
            feature_cache_dir=str(_get(rc, d, "feature-cache-dir")),
        )
