"""One run config, resolved at the edge: defaults, then a TOML file, then flags; validated before training.

The config is Flower's flat run config (hyphenated keys), the same dict every ServerApp and ClientApp reads
from `context.run_config`. The defaults are the union of each concern's config class; pyproject.toml's
`[tool.flwr.app.config]` holds the same table for `flwr run` (a test keeps the two equal).
"""

from __future__ import annotations

import sys
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common import ConfigError, DataConfig, DataError, TrainConfig
from common.compression import CompressionConfig
from common.config import with_recommended
from common.devices import resolve_device
from common.paths import input_dir, input_file, output_dir
from common.secagg_config import SecAggConfig
from privacy import DPConfig, PrivacyError
from server import ServerConfig


def default_run_config() -> dict[str, Any]:
    merged: dict[str, Any] = {}
    for cls in (DataConfig, TrainConfig, ServerConfig, DPConfig, SecAggConfig, CompressionConfig):
        merged.update(cls.DEFAULTS)
    return merged


def read_config_file(path: str | Path) -> dict[str, Any]:
    """A TOML file of run-config keys, flat (`num-rounds = 5`) or under [tool.flwr.app.config] (a pyproject)."""
    path = input_file(path, "--config", "TOML file")
    try:
        table = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist; check the path given to --config") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {path} is not valid TOML ({exc}); fix the file") from None
    return dict(table.get("tool", {}).get("flwr", {}).get("app", {}).get("config", table))


def resolve(config_file: str | Path | None, overrides: Mapping[str, Any]) -> dict[str, Any]:
    """defaults < file < flags. An unknown key is an error, not something silently ignored."""
    config = default_run_config()
    layers = [read_config_file(config_file)] if config_file else []
    for layer in [*layers, dict(overrides)]:
        unknown = sorted(set(layer) - set(config))
        if unknown:
            raise ConfigError(f"unknown config key {unknown[0]!r}; known keys: {', '.join(sorted(config))}")
        for key, value in layer.items():
            default = config[key]
            config[key] = _coerce(key, value, default)
    config["out-dir"] = str(output_dir(config["out-dir"], "--out (out-dir)"))
    if config["data-dir"]:
        input_dir(config["data-dir"], "--data-dir (data-dir)", "folder holding the dataset's files")
    if config["resume-from"]:
        input_dir(config["resume-from"], "resume-from", "folder of the run to continue")
    return with_recommended(config)


def _coerce(key: str, value: Any, default: Any) -> Any:
    """Keep each key's type (Flower's run config holds str, int, float and bool)."""
    if isinstance(value, str) and not isinstance(default, str):
        try:
            if isinstance(default, bool):
                if value.lower() not in ("true", "false"):
                    raise ValueError
                return value.lower() == "true"
            return type(default)(float(value)) if isinstance(default, int) else float(value)
        except ValueError:
            raise ConfigError(f"{key} = {value!r} is not a {type(default).__name__}") from None
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


@dataclass(frozen=True)
class Configs:
    data: DataConfig
    train: TrainConfig
    server: ServerConfig
    dp: DPConfig


def validate(run_config: Mapping[str, Any]) -> Configs:
    """Everything that can be known before training starts: values, data files, partitions, model fit."""
    configs = Configs(DataConfig.from_run_config(run_config), TrainConfig.from_run_config(run_config),
                      ServerConfig.from_run_config(run_config), DPConfig.from_run_config(run_config))
    resolve_device(configs.train.device)  # CUDA asked where there is none: an error now, not mid-run
    compression = CompressionConfig.from_run_config(run_config)
    compression.check_strategy(configs.server.strategy)
    if compression.enabled and SecAggConfig.from_run_config(run_config).enabled:
        raise ConfigError(f"compress = {compression.method} cannot be combined with secagg: the server sees only "
                          "the masked sum, never a client's encoded update; use compress=none with secagg")
    # Imported here: torch and the model zoo cost seconds, which building the command line should not pay.
    from common import load_dataset, partition_data
    from common.features import check_cache_dir
    from models import build_model, split_stages

    dataset = load_dataset(configs.data.dataset, configs.data.data_dir or None, configs.data.text_max_length,
                           configs.data.text_stride)
    if configs.data.num_clients > len(dataset.y_train):
        raise DataError(f"num-clients = {configs.data.num_clients} is more than the {len(dataset.y_train)} training "
                        f"examples of {configs.data.dataset}; use fewer clients")
    first = partition_data(configs.data, 0)  # partitions are computed (and cached) here, so a bad spec fails now
    stage, model = split_stages(build_model(configs.train.model, dataset.spec))
    if stage is not None:  # its features are cached on disk: an unwritable folder must fail now
        check_cache_dir(configs.train.feature_cache_dir)
    check_dp(configs, model, first.num_examples)
    check_secagg(run_config, configs, model)
    return configs


def check_secagg(run_config: Mapping[str, Any], configs: Configs, model: Any) -> None:
    """Secure aggregation settings the run cannot meet (threshold, bits, strategy) fail before training."""
    cfg = SecAggConfig.from_run_config(run_config)
    if not cfg.enabled:
        return
    if "local" in configs.dp.modes:
        raise PrivacyError("dp=local already noises every update on its own; with secagg use dp=user "
                           "(distributed DP) or dp=sample")
    if configs.server.strategy != "fedavg":
        raise ConfigError(f"secagg computes a uniform FedAvg of the clients' summed updates; strategy "
                          f"{configs.server.strategy!r} needs individual updates: use --strategy fedavg")
    from server.secagg import SecureRounds

    dim = sum(int(v.numel()) for v in model.state_dict().values())
    SecureRounds(None, cfg, configs.dp, configs.data.num_clients, configs.server.fraction_train,  # type: ignore[arg-type]
                 configs.server.seed, dim)


def check_dp(configs: Configs, model: Any, num_examples: int) -> None:
    """DP settings that a strategy or model cannot honour are errors now, not surprises after training."""
    dp, strategy = configs.dp, configs.server.strategy
    if "sample" in dp.modes:
        from models import check_trainable_with_dp

        check_trainable_with_dp(model)
        if strategy == "fedprox" or configs.train.proximal_mu > 0:
            raise PrivacyError("dp=sample cannot be combined with FedProx: its proximal term is not a per-example "
                               "loss, so DP-SGD could not clip it; use --strategy fedavg (or another) with mu 0")
    if "user" in dp.modes:
        if strategy != "fedavg":
            raise PrivacyError(f"dp=user runs DP-FedAvg (a uniform mean of clipped updates plus noise); strategy "
                               f"{strategy!r} cannot honour it: use --strategy fedavg")
        if dp.user_clipping != "fixed":
            raise PrivacyError("user-clipping=adaptive is not supported yet: the noise on its clipped-count "
                               "estimate is not accounted for; use user-clipping=fixed")
    if "local" in dp.modes and strategy != "fedavg":
        raise PrivacyError(f"dp=local is Flower's LocalDpMod on every update; use --strategy fedavg, not {strategy!r}")
    if dp.modes and (warning := dp.warn_delta(num_examples if "sample" in dp.modes else configs.data.num_clients)):
        print(f"warning: {warning}", file=sys.stderr)


