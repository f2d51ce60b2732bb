"""fedpriv's ClientApp: the data owner's side of every round, in simulation and in deployment alike.

Node config (per data owner): `partition-id` (simulation: which share of the named dataset) or `data-path`
(deployment: the owner's own .npz/.csv file); optionally `client-id`, `state-dir` (where the privacy ledger
is kept across restarts) and the owner's own budget `budget-epsilon` / `budget-delta`.
"""

from __future__ import annotations

from dataclasses import replace

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.guard import load_ledger, owner_budget, plan_round, save_ledger
from client.reuse import load_global, reusable_model, reusable_optimizer
from client.secagg import register as register_secagg
from common.arrays import array_record, pack_arrays, unpack_arrays
from common.compression import compress_update
from common.config import DataConfig, TrainConfig
from common.devices import client_device, to_device
from common.features import staged
from common.local_dp import local_dp
from common.messages import get_record
from common.task import ClientData, client_seed, file_data, partition_data
from common.training import evaluate, train
from models import build_model
from privacy import Budget, DPConfig, PrivacyLedger, Step, compute_epsilon
from privacy.canaries import GradientCanaries, gradient_canaries


def packed_transport(msg: Message, context: Context, call_next) -> Message:  # noqa: ANN001 - Flower's ClientAppCallable
    """Outermost on every message: a deployed server packs each ArrayRecord into one Array (fewer HTTP requests
    a message, common.arrays); unpacked here before anything reads it, and the reply is packed alike."""
    packed = unpack_arrays(msg.content)
    reply = call_next(msg, context)
    if packed and not reply.has_error():
        pack_arrays(reply.content)
    return reply


app = ClientApp(mods=[packed_transport])


def local_data(context: Context) -> tuple[ClientData, DataConfig]:
    cfg = DataConfig.from_run_config(context.run_config)
    node = context.node_config
    if "data-path" in node:
        return file_data(str(node["data-path"]), cfg, str(node.get("client-id", "")) or None), cfg
    return partition_data(cfg, int(node["partition-id"])), cfg


def _meta(data: ClientData) -> ConfigRecord:
    return ConfigRecord({"client-id": data.client_id})


@app.query()
def hello(msg: Message, context: Context) -> Message:
    """Tells the server who this node is, so it can sample and record by client id."""
    data, _ = local_data(context)
    return Message(RecordDict({"meta": _meta(data)}), reply_to=msg)


# compress_update is outermost: it encodes the update after any DP noise (post-processing, no privacy cost).
@app.train(mods=[compress_update, local_dp])
def train_round(msg: Message, context: Context) -> Message:
    data, data_cfg = local_data(context)
    cfg = TrainConfig.from_run_config(context.run_config)
    config = get_record(msg.content, "config", ConfigRecord) or ConfigRecord()
    server_round = int(config.get("server-round", 0))
    # FedProx sends its mu with the round's config; it takes precedence over the run config's.
    cfg = replace(cfg, proximal_mu=float(config.get("proximal-mu", cfg.proximal_mu)))

    dp = DPConfig.from_run_config(context.run_config)
    seed = client_seed(data_cfg.seed, server_round, data.client_id)
    device = client_device(context.run_config, context.node_config)
    privacy = None
    if "sample" in dp.modes:
        # A fresh module (Opacus cannot wrap one twice). A model with a fixed feature stage (scatter-*) trains
        # only its head, on features computed once (cached).
        model, data = staged(build_model(cfg.model, data.spec), data, cfg.feature_cache_dir)
        model = to_device(load_global(model, msg.content["arrays"]), device)
        ledger = load_ledger(context, data.client_id)
        budget = owner_budget(dp, context)
        # The client calibrates for every round the run may sample it for; its guard refuses any beyond.
        planned_rounds = int(context.run_config.get("num-rounds", 1))
        plan = plan_round(dp, data.num_examples, cfg.batch_size, cfg.local_epochs, planned_rounds, ledger, budget)
        if not plan.allowed:
            meta = _meta(data)
            meta["refused"] = plan.decision.reason
            privacy = _privacy_record(dp, ledger, data, budget, plan.step)
            return Message(RecordDict({"meta": meta, "privacy": privacy}), reply_to=msg)
        from client.dpsgd import train_private  # opacus: imported by the runs that use it, not at start-up

        result = train_private(model, data.x_train, data.y_train, cfg, noise_multiplier=plan.step.noise_multiplier,
                               max_grad_norm=dp.max_grad_norm, seed=seed, grad_sample_mode=cfg.grad_sample_mode,
                               canaries=_audit_canaries(dp, model, plan.step.sample_rate, server_round, data))
        # Spent once the update leaves the owner: recorded (and persisted) before the reply is built.
        epsilon = compute_epsilon([*ledger.history(), plan.step], dp.delta, dp.accountant)
        ledger.record(server_round, plan.step, epsilon, run=str(context.run_id))
        save_ledger(context, ledger)
        privacy = _privacy_record(dp, ledger, data, budget, plan.step)
        privacy["grad-sample-mode"] = str(result["grad-sample-mode"])  # bk, or the Opacus mode it fell back to
    else:
        # The process's own module and optimizer, weights loaded in place, state cleared (client/reuse.py).
        model, data = staged(reusable_model(cfg.model, data.spec), data, cfg.feature_cache_dir)
        model = to_device(load_global(model, msg.content["arrays"]), device)
        result = train(model, data.x_train, data.y_train, cfg, seed=seed, optimizer=reusable_optimizer(model, cfg))
    metrics = MetricRecord({"train_loss": result["loss"], "train_accuracy": result["accuracy"],
                            "steps": result["steps"], "num-examples": data.num_examples,
                            # user-level DP averages clients uniformly (its noise assumes an unweighted mean)
                            "unit-weight": 1})
    # array_record copies each tensor to the host; the model itself stays on its device for the next round
    content = RecordDict({"arrays": array_record(model.state_dict()), "metrics": metrics, "meta": _meta(data)})
    if privacy is not None:
        content["privacy"] = privacy
    return Message(content, reply_to=msg)


def _audit_canaries(dp: DPConfig, model, sample_rate: float, server_round: int,  # noqa: ANN001
                    data: ClientData) -> GradientCanaries | None:
    """An audit run (fedpriv audit) puts its gradient canaries into the host client's DP-SGD only."""
    if not dp.audit_canaries or data.client_id != dp.audit_host:
        return None
    sizes = [(name, p.numel()) for name, p in model.named_parameters()]
    specs = gradient_canaries(sizes, dp.audit_canaries, dp.audit_seed)
    return GradientCanaries(specs, sample_rate, dp.max_grad_norm, dp.audit_seed, server_round, data.client_id)


def _privacy_record(dp: DPConfig, ledger: PrivacyLedger, data: ClientData, budget: Budget | None,
                    step: Step) -> ConfigRecord:
    """What the server needs to account for this client independently: its whole ledger and its settings."""
    return ConfigRecord({
        "ledger": ledger.to_json(), "max-grad-norm": dp.max_grad_norm, "num-examples": data.num_examples,
        "noise-multiplier": step.noise_multiplier, "sample-rate": step.sample_rate,
        "accountant": dp.accountant, "delta": dp.delta,
        "budget-epsilon": budget.epsilon if budget else 0.0, "budget-delta": budget.delta if budget else 0.0,
    })


@app.evaluate()
def evaluate_round(msg: Message, context: Context) -> Message:
    """Evaluates the global model on this client's held-out split."""
    data, _ = local_data(context)
    cfg = TrainConfig.from_run_config(context.run_config)
    metrics = {}
    if len(data.y_val):
        model, data = staged(reusable_model(cfg.model, data.spec), data, cfg.feature_cache_dir)
        model = load_global(model, msg.content["arrays"], read_only=True)
        metrics = evaluate(to_device(model, client_device(context.run_config, context.node_config)), data.x_val,
                           data.y_val)
    metrics["num-examples"] = len(data.y_val)
    return Message(RecordDict({"metrics": MetricRecord(metrics), "meta": _meta(data)}), reply_to=msg)


# Secure aggregation's four actions (client/secagg.py); collect trains through train_round above.
register_secagg(app, train_round)
