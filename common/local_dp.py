"""`dp=local`: the Flower mod that privatizes a client's update before it leaves the client. In common/ because
the server's local-DP audit (server/audit.py) sends its canary clients' updates through this same mod."""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp.mod import LocalDpMod

from privacy import DPConfig


def local_dp(msg: Message, context: Context, call_next) -> Message:  # noqa: ANN001 - Flower's ClientAppCallable
    """Flower's LocalDpMod clips this client's update and adds Gaussian noise before it leaves. Its
    (epsilon, delta) holds per round; the server's privacy record composes it over the rounds."""
    dp = DPConfig.from_run_config(context.run_config)
    if "local" not in dp.modes:
        return call_next(msg, context)
    mod = LocalDpMod(clipping_norm=dp.max_grad_norm, sensitivity=dp.local_sensitivity, epsilon=dp.local_epsilon,
                     delta=dp.delta)
    return mod(msg, context, call_next)
