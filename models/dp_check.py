"""Check that a model can be trained with Opacus DP-SGD, naming the offending layers and the fix."""

from __future__ import annotations

from torch import nn

from models.task import ModelError

_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
_INSTANCE_NORMS = (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)
_MAX_NAMES = 5  # keep the one-line message readable for deep networks

# Layer type -> (why DP-SGD cannot use it, the fix).
_KNOWN: dict[type[nn.Module], tuple[str, str]] = {
    **{
        bn: (
            "mixes examples in a batch",
            "replace {it} with GroupNorm (opacus ModuleValidator.fix does this)",
        )
        for bn in _BATCH_NORMS
    },
    **{
        norm: (
            "tracks running statistics across examples",
            "build {it} with track_running_stats=False (opacus ModuleValidator.fix does this)",
        )
        for norm in _INSTANCE_NORMS
    },
    nn.LSTM: (
        "fuses its weights so Opacus cannot take per-example gradients",
        "replace {it} with opacus.layers.DPLSTM (opacus ModuleValidator.fix does this)",
    ),
    nn.GRU: (
        "fuses its weights so Opacus cannot take per-example gradients",
        "replace {it} with opacus.layers.DPGRU (opacus ModuleValidator.fix does this)",
    ),
    nn.MultiheadAttention: (
        "fuses its weights so Opacus cannot take per-example gradients",
        "replace {it} with opacus.layers.DPMultiheadAttention (opacus ModuleValidator.fix does this)",
    ),
}


def _offending_layers(model: nn.Module) -> dict[type[nn.Module], list[str]]:
    """Names of layers Opacus's validators reject, grouped by layer type, in model order."""
    from opacus.validators import ModuleValidator
    found: dict[type[nn.Module], list[str]] = {}
    for name, module in model.named_modules():
        kind = type(module)
        # A frozen BatchNorm is skipped by Opacus (it only checks trainable layers), yet in training mode
        # it still normalises each example with its batch-mates' statistics, so flag it too.
        if isinstance(module, _BATCH_NORMS):
            found.setdefault(kind, []).append(name or "<root>")
            continue
        trainable = any(p.requires_grad for p in module.parameters(recurse=False))
        validator = ModuleValidator.VALIDATORS.get(kind)
        if trainable and validator is not None and validator(module):
            found.setdefault(kind, []).append(name or "<root>")
    return found


def _describe(kind: type[nn.Module], names: list[str]) -> str:
    quoted = ", ".join(f"'{n}'" for n in names[:_MAX_NAMES])
    if len(names) > _MAX_NAMES:
        quoted += f" and {len(names) - _MAX_NAMES} more"
    subject = f"layer {quoted} is" if len(names) == 1 else f"layers {quoted} are"
    reason, fix = _KNOWN.get(
        kind, ("rejected by opacus ModuleValidator", "run opacus ModuleValidator.fix(model) or replace {it}")
    )
    fix = fix.format(it="it" if len(names) == 1 else "them")
    return f"{subject} {kind.__name__}, which {reason}; {fix}"


def check_trainable_with_dp(model: nn.Module) -> None:
    """Raise ModelError unless Opacus can train `model` with DP-SGD.

    Wraps opacus ModuleValidator.validate(strict=False) and turns its findings into one line that
    names each offending layer and how to fix it.
    """
    if not isinstance(model, nn.Module):
        raise ModelError(f"expected a torch.nn.Module, got {type(model).__name__}; pass the model itself")
    # Imported here: opacus costs seconds to import; only DP runs check their model with it.
    from opacus.validators import ModuleValidator

    errors = ModuleValidator.validate(model, strict=False)
    layers = _offending_layers(model)
    if not errors and not layers:
        return
    problems = [_describe(kind, names) for kind, names in layers.items()]
    if not model.training:
        problems.append("the model is in eval mode; call model.train() before DP training")
    if not problems:  # a validator we do not know about: pass on Opacus's own words, on one line
        problems = [" ".join(str(e).split()) for e in errors]
    raise ModelError("model cannot be trained with DP-SGD: " + "; ".join(problems))
