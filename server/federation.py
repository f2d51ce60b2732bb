"""One federated run, start to records: what the ServerApp does, whatever engine delivers its messages."""

from __future__ import annotations

import io
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, Message
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from common import DataConfig, TrainConfig, evaluate, load_dataset
from common.arrays import as_numpy
from common.compression import CompressionConfig
from common.devices import resolve_device
from common.features import resolve_cache_dir, staged_test
from common.textgen import TEXT_DATASETS, write_run_sample
from common.training import as_tensor
from models import build_model
from privacy import DPConfig, PrivacyLedger
from privacy.files import write_atomic
from server.aggregation import Accumulator, AccumulatorFactory, WeightedMean, folded
from server.audit import LocalCanaries, SampleCanaryScores, UserCanaries, build_auditor, write_scores
from server.config import ServerConfig
from server.ema import ModelEMA, prefixed, save_ema
from server.privacy_records import ClientPrivacy, PrivacyTracker
from server.records import RunRecords
from server.rounds import LoopSettings, RoundRecord, run_rounds
from server.secagg import secure_rounds
from server.strategies import build_strategy
from server.userdp import ClippedSum, build_user_dp_strategy

log = logging.getLogger("fedpriv")

CHECKPOINT = "checkpoint.pt"


@dataclass
class Checkpoint:
    """Everything a resumed run needs to go on as if never stopped: the last finished round, the global
    weights, the strategy object (server-side optimizer moments, DP wrapper state) and the privacy record."""

    round: int
    arrays: dict[str, Any]
    strategy: Strategy
    privacy_clients: dict[str, tuple[str, dict[str, Any], list[int]]]
    user_rounds: int
    ema: dict[str, Any] | None = None  # the moving average of the global model, when ema-decay > 0

    def save(self, out_dir: Path) -> None:
        buffer = io.BytesIO()
        torch.save(self.__dict__, buffer)
        write_atomic(out_dir / CHECKPOINT, buffer.getvalue())

    @classmethod
    def load(cls, run_dir: Path) -> Checkpoint:
        path = run_dir / CHECKPOINT
        if not path.exists():
            raise FileNotFoundError(f"{path} does not exist; resume needs a run folder with a finished round")
        # Our own file, written by save() above: it holds a pickled strategy, hence weights_only=False.
        return cls(**torch.load(path, weights_only=False))


def host_tensors(arrays: ArrayRecord) -> dict[str, torch.Tensor]:
    """Read-only tensors over the Arrays' own bytes: no np.load per array (ArrayRecord.to_torch_state_dict), no
    copy. For readers only: load_state_dict copies them, torch.save writes them (a pickled numpy array would be
    copied twice: 6 ms of a 0.2 s round at 1000 clients)."""
    return {k: as_tensor(as_numpy(v)) for k, v in arrays.items()}


def run_federation(grid: Grid, run_config: Mapping[str, Any], *, progress: bool = True) -> dict[str, Any]:
    """Train for the configured rounds and keep the records current; returns the final server metrics."""
    data_cfg = DataConfig.from_run_config(run_config)
    train_cfg = TrainConfig.from_run_config(run_config)
    server_cfg = ServerConfig.from_run_config(run_config)
    dp = DPConfig.from_run_config(run_config)
    CompressionConfig.from_run_config(run_config).check_strategy(server_cfg.strategy)  # before any training
    out_dir = Path(server_cfg.out_dir)
    resume_from = server_cfg.resume_from

    dataset = load_dataset(data_cfg.dataset, data_cfg.data_dir or None, data_cfg.text_max_length, data_cfg.text_stride)
    model = build_model(train_cfg.model, dataset.spec, seed=server_cfg.seed)
    device = resolve_device(train_cfg.device)
    # A staged model (scatter-*): the federation averages its head; the test set goes through its fixed features.
    model, x_test = staged_test(model, dataset.x_test, resolve_cache_dir(train_cfg.feature_cache_dir))
    ema = ModelEMA(server_cfg.ema_decay) if server_cfg.ema_decay else None
    records = RunRecords(out_dir, run_config, keep_existing=bool(resume_from))
    tracker = PrivacyTracker(out_dir, dp, data_cfg.num_clients, server_cfg.fraction_train) if dp.modes else None

    def evaluate_global(server_round: int, arrays: ArrayRecord) -> dict[str, float]:
        model.load_state_dict(host_tensors(arrays))
        metrics = evaluate_on_device(model)
        # run_rounds evaluates once per round, after aggregation: the one place to fold in the new model.
        if ema is not None and server_round > 0:
            average = ema.update({k: as_numpy(v) for k, v in arrays.items()})
            model.load_state_dict({k: torch.from_numpy(v) for k, v in average.items()})
            metrics.update(prefixed(evaluate_on_device(model)))
        return metrics

    def evaluate_on_device(module: torch.nn.Module) -> dict[str, float]:
        try:  # on the run's device, and back: model.pt and the first round's arrays stay host tensors
            return evaluate(module.to(device), x_test, dataset.y_test)
        finally:
            module.cpu()

    # An audit run (fedpriv audit) scores canaries; None otherwise.
    auditor = build_auditor(dp, model, ArrayRecord(model.state_dict()), server_cfg.fraction_train, dict(run_config))
    user_canaries = auditor if isinstance(auditor, UserCanaries) else None
    # FedAvg and DP-FedAvg take the replies one at a time as they come (server/aggregation.py); the other
    # strategies get them all at the round's end (Flower's aggregate_train).
    accumulate: AccumulatorFactory | None = None
    if "user" in dp.modes:
        strategy: Strategy = build_user_dp_strategy(dp, data_cfg.num_clients, server_cfg.fraction_train)

        def accumulate(server_round: int, arrays: ArrayRecord) -> Accumulator:
            return ClippedSum(strategy, server_round, arrays, dp, server_cfg.fraction_train, server_cfg.seed,
                              canaries=user_canaries)
    else:
        strategy = build_strategy(server_cfg, proximal_mu=train_cfg.proximal_mu)
        if server_cfg.strategy == "fedavg":
            def accumulate(server_round: int, arrays: ArrayRecord) -> Accumulator:
                return WeightedMean()
    aggregate = None
    if isinstance(auditor, SampleCanaryScores | LocalCanaries):
        # The auditor reads every reply before aggregation: replies are kept whole and folded in at the end.
        make, accumulate = accumulate, None

        def aggregate(server_round: int, replies: list[Message], arrays: ArrayRecord) -> ArrayRecord | None:
            auditor.observe(server_round, replies, arrays)  # what the server received, before any aggregation
            if make is not None:
                return folded(make(server_round, arrays), replies)
            return strategy.aggregate_train(server_round, replies)[0]

    secure = secure_rounds(grid, run_config, dp, model, tracker)  # None unless secagg = true

    start_round = 1
    if resume_from:
        ckpt = Checkpoint.load(Path(resume_from))
        start_round, strategy = ckpt.round + 1, ckpt.strategy
        if ema is not None and ckpt.ema is not None:
            ema.state = dict(ckpt.ema)
        arrays = ArrayRecord({k: torch.as_tensor(v) for k, v in ckpt.arrays.items()})
        if tracker is not None:
            tracker.server_rounds = ckpt.user_rounds
            tracker.clients = {cid: ClientPrivacy(PrivacyLedger.from_json(lj), settings, refused)
                               for cid, (lj, settings, refused) in ckpt.privacy_clients.items()}
        log.info("resuming %s after round %d", resume_from, ckpt.round)
    else:
        arrays = ArrayRecord(model.state_dict())
        records.add_round(RoundRecord(round=0, server=evaluate_global(0, arrays)).as_dict())

    settings = LoopSettings(
        num_rounds=server_cfg.num_rounds,
        fraction_train=server_cfg.fraction_train,
        fraction_evaluate=server_cfg.fraction_evaluate,
        max_evaluate_clients=server_cfg.max_evaluate_clients,
        seed=server_cfg.seed,
        round_timeout=server_cfg.round_timeout,
        client_sampling=dp.client_sampling if "user" in dp.modes else "fixed",
        min_clients=server_cfg.min_clients,
        start_round=start_round,
    )
    bar = Progress(TextColumn("[bold]rounds"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.description}"),
                   TimeElapsedColumn(), console=Console(stderr=True), disable=not progress)

    with bar:
        task = bar.add_task("", total=server_cfg.num_rounds, completed=start_round - 1)

        def on_round(record: RoundRecord, arrays: ArrayRecord) -> None:
            records.add_round(record.as_dict())
            if tracker is not None:
                tracker.observe(record.round, record.privacy, record.refused)
                tracker.write()
            Checkpoint(
                round=record.round,
                arrays=host_tensors(arrays),
                strategy=strategy,
                privacy_clients={cid: (c.ledger.to_json(), c.settings, c.refused_rounds)
                                 for cid, c in (tracker.clients.items() if tracker else [])},
                user_rounds=tracker.server_rounds if tracker else 0,
                ema=ema.state if ema is not None else None,
            ).save(out_dir)
            acc = record.server.get("accuracy", float("nan"))
            bar.update(task, completed=record.round, description=f"server accuracy {acc:.4f}")

        try:
            arrays = run_rounds(grid, strategy, arrays, settings, evaluate_global, on_round, aggregate,
                                secure_train=secure, accumulate=accumulate)
        finally:  # metrics.json holds every finished round, however the run ends
            records.flush()

    records.save_model(arrays.to_torch_state_dict())
    if ema is not None and ema.state is not None:
        save_ema(out_dir, ema.state)
    if auditor is not None:
        write_scores(out_dir, auditor)
    if data_cfg.dataset in TEXT_DATASETS:  # a language model: a sample of its writing, shown in the report
        write_run_sample(out_dir)
    if tracker is not None:
        from privacy.report import render_reports

        render_reports(out_dir)
    return records.final_server_metrics()
