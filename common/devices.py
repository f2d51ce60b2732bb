"""Where training and evaluation run: `device = auto | cpu | cuda | cuda:N` (run config; a deployed client's
own `--device`, node config `device`, overrides it on that client).

The model moves to the device; the data stays in (shared, read-only) host memory and each batch is copied over,
so a GPU client keeps no second copy of the dataset. Updates leave on the CPU, so the records and the wire
format never depend on where a client trained.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from common.config import ConfigError

if TYPE_CHECKING:
    import torch

DEVICE_HELP = "auto | cpu | cuda | cuda:N"
_SYNTAX = re.compile(r"auto|cpu|cuda(:\d+)?")


def check_device_name(name: str, key: str = "device") -> str:
    name = str(name).strip().lower()
    if not _SYNTAX.fullmatch(name):
        raise ConfigError(f"{key} = {name!r} is not a device; use one of {DEVICE_HELP} (e.g. cuda:0)")
    return name


def resolve_device(name: str, key: str = "device") -> torch.device:
    """The torch device for a name, on this machine; CUDA asked where there is none is an error, not a CPU
    run in disguise. `auto` is the first GPU when there is one, else the CPU."""
    import torch  # here, not at import: building the command line should not pay for torch

    name = check_device_name(name, key)
    if name == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        build = f"torch {torch.__version__}" + ("" if torch.version.cuda else ", a build without CUDA")
        raise ConfigError(f"{key} = {name!r}, but this machine has no usable CUDA GPU ({build}); use "
                          f"{key} = cpu or auto")
    index = int(name.partition(":")[2] or 0)
    if index >= torch.cuda.device_count():
        raise ConfigError(f"{key} = {name!r}, but this machine has {torch.cuda.device_count()} CUDA device(s) "
                          f"(cuda:0..cuda:{torch.cuda.device_count() - 1}); choose one of those, or auto")
    return torch.device(f"cuda:{index}")


def client_device(run_config: Mapping[str, Any], node_config: Mapping[str, Any]) -> torch.device:
    """A client's device: its own node config's `device` when it has one, else the run config's."""
    if "device" in node_config and str(node_config["device"]):
        return resolve_device(str(node_config["device"]), "node config device (fedpriv client --device)")
    return resolve_device(str(run_config.get("device", "cpu")))


def to_device(model: torch.nn.Module, device: torch.device | str) -> torch.nn.Module:
    """`model.to(device)`, skipped when its first parameter is already there: `.to` walks every submodule even
    when nothing moves (about 0.5 ms for a small model, paid on every message)."""
    import torch

    first = next(model.parameters(), None)
    if first is not None and first.device == torch.device(device):
        return model
    return model.to(device)
