"""fedpriv's ClientApp: the data owner's side of every round, in simulation and in deployment alike.

Node config (per data owner): `partition-id` (simulation: which share of the named dataset) or `data-path`
(deployment: the owner's own .npz/.csv file), and optionally `client-id`.
"""

from __future__ import annotations

from dataclasses import replace

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.config import DataConfig, TrainConfig
from client.task import ClientData, client_seed, file_data, partition_data
from client.training import evaluate, train
from models import build_model

app = ClientApp()


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


@app.train()
def train_round(msg: Message, context: Context) -> Message:
    data, data_cfg = local_data(context)
    cfg = TrainConfig.from_run_config(context.run_config)
    config = msg.content.config_records.get("config", ConfigRecord())
    server_round = int(config.get("server-round", 0))
    # FedProx sends its mu with the round's config; it takes precedence over the run config's.
    cfg = replace(cfg, proximal_mu=float(config.get("proximal-mu", cfg.proximal_mu)))

    model = build_model(cfg.model, data.spec)
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    result = train(model, data.x_train, data.y_train, cfg, seed=client_seed(data_cfg.seed, server_round,
                                                                              data.client_id))
    metrics = MetricRecord({"train_loss": result["loss"], "train_accuracy": result["accuracy"],
                            "steps": result["steps"], "num-examples": data.num_examples})
    content = RecordDict({"arrays": ArrayRecord(model.state_dict()), "metrics": metrics, "meta": _meta(data)})
    return Message(content, reply_to=msg)


@app.evaluate()
def evaluate_round(msg: Message, context: Context) -> Message:
    """Evaluates the global model on this client's held-out split."""
    data, _ = local_data(context)
    cfg = TrainConfig.from_run_config(context.run_config)
    model = build_model(cfg.model, data.spec)
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    metrics = evaluate(model, data.x_val, data.y_val) if len(data.y_val) else {}
    metrics["num-examples"] = len(data.y_val)
    return Message(RecordDict({"metrics": MetricRecord(metrics), "meta": _meta(data)}), reply_to=msg)
