"""A secure training round: SecAgg+ (server/secagg_protocol.py) over Flower custom actions, in place of
the plain train phase of fedpriv's round loop. Evaluate messages stay plain.

The aggregate is a uniform mean of the survivors' updates:
- `secagg` alone: FedAvg of quantized updates, divided by the number of survivors;
- `dp=user` + `secagg` (distributed DP): the noisy sum of clipped, rotated, Skellam-noised updates, divided
  by the fixed denominator of user-level DP (sampled m, or q*N under Poisson sampling: see server/userdp.py);
- `dp=sample` + `secagg`: DP-SGD on each client, then the masked sum, divided by the survivors.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid

from common import ConfigError, DataConfig
from common.secagg_codec import decode_sum, encoded_length, flatten, unflatten
from common.secagg_config import SecAggConfig
from common.secagg_crypto import from_ring, plain_scale
from privacy import DPConfig
from privacy.skellam import SkellamPlan, plan_skellam
from server.config import ServerConfig
from server.privacy_records import PrivacyTracker
from server.rounds import ClientDirectory, RoundRecord, _client_sort_key, exchange
from server.secagg_protocol import ProtocolSettings, run_protocol

log = logging.getLogger("fedpriv")

ACTIONS = {"setup": "query.secagg_setup", "share": "query.secagg_share", "collect": "train.secagg_collect",
           "unmask": "query.secagg_unmask"}
STATE_KEY = "secagg"
EDGE = 0.9  # a decoded sum coordinate beyond this share of the half-range may have wrapped around


class SecureRounds:
    """The secure train phase for every round of one run; remembers who survived, for the accountant."""

    def __init__(self, grid: Grid, cfg: SecAggConfig, dp: DPConfig, num_clients: int, fraction: float,
                 seed: int, dim: int) -> None:
        self.grid, self.cfg, self.dp, self.seed, self.dim = grid, cfg, dp, seed, dim
        self.num_clients, self.fraction = num_clients, fraction
        poisson = "user" in dp.modes and dp.client_sampling == "poisson"  # as the round loop samples
        self.expected = max(1, math.floor(num_clients * fraction + 1e-9))
        # Clients a round may sample: m of N when fixed, up to N under Poisson sampling.
        self.max_clients = num_clients if poisson else self.expected
        self.threshold = cfg.threshold_for(self.expected)  # ConfigError now, before any training
        self.plan: SkellamPlan | None = None
        if "user" in dp.modes:
            self.plan = plan_skellam(dp.user_clipping_norm, dp.user_noise_multiplier, cfg.bits, dim,
                                     self.threshold, max(self.max_clients, self.threshold), noise=cfg.noise)
        self.survivors_per_round: list[int] = []  # released rounds only: what the accountant composes

    def codec(self, server_round: int) -> dict[str, Any]:
        bits = self.cfg.bits
        if self.plan is None:
            return {"codec": "plain", "bits": bits, "clip-range": self.cfg.clip_range,
                    "scale": plain_scale(self.cfg.clip_range, bits, self.max_clients)}
        p = self.plan
        return {"codec": "skellam", "bits": bits, "gamma": p.gamma, "clip-norm": p.clip_norm,
                "rotation-seed": int(np.random.SeedSequence([self.seed, server_round, 7]).generate_state(1)[0]),
                "padded-dim": p.padded_dim, "lambda": p.client_lambda, "norm-bound": p.norm_bound,
                "noise": p.noise}

    def __call__(self, server_round: int, record: RoundRecord, directory: ClientDirectory,
                 arrays: ArrayRecord) -> ArrayRecord | None:
        nodes = [directory.node_of(c) for c in record.sampled]
        name = {n: directory.by_node.get(n, str(n)) for n in nodes}
        settings = ProtocolSettings(self.cfg.shares, self.threshold, self.cfg.bits,
                                    graph_seed=int(np.random.SeedSequence([self.seed, server_round, 3])
                                                   .generate_state(1)[0]))
        plan = self.codec(server_round)
        collected: dict[int, Message] = {}

        def transport(stage: str, requests: dict[int, dict[str, Any]]) -> dict[int, dict[str, Any]]:
            messages = []
            for node, request in requests.items():
                content = RecordDict({STATE_KEY: ConfigRecord(request)})
                if stage == "collect":
                    content["arrays"] = arrays
                    content["config"] = ConfigRecord({"server-round": server_round})
                messages.append(Message(content, dst_node_id=node, message_type=ACTIONS[stage]))
            replies = {}
            for reply in exchange(self.grid, messages, self.cfg.stage_timeout):
                node = reply.metadata.src_node_id
                replies[node] = self._payload(reply, record, name.get(node, str(node)))
                if stage == "collect":
                    collected[node] = reply
            return replies

        out = run_protocol(server_round, nodes, settings, transport, plan, encoded_length(plan, self.dim))
        for d in out.dropped:
            cid = name.get(d["node"], str(d["node"]))
            if not any(r["client_id"] == cid for r in record.refused):
                record.dropped.append({"client_id": cid, "reason": f"secagg {d['stage']}: {d['reason']}"})
        out.survivors.sort(key=lambda n: _client_sort_key(name[n]))
        for node in out.survivors:
            reply = collected[node]
            metrics = reply.content.metric_records.get("metrics", MetricRecord())
            record.train.append({"client_id": name[node], "metrics": dict(metrics.items())})
        summary: dict[str, Any] = {
            "stage_reached": out.stage_reached, "threshold": self.threshold, "codec": plan["codec"],
            "bits": self.cfg.bits, "survivors": [name[n] for n in out.survivors],
            "dropped": [{"client_id": name.get(d["node"], str(d["node"])), "stage": d["stage"],
                         "reason": d["reason"]} for d in out.dropped],
            "unmasked_from_shares": [name.get(n, str(n)) for n in out.unmasked_from_shares],
            "released": out.total is not None, "refused": out.refused,
        }
        record.secagg = summary
        if out.total is None:
            return None
        total = decode_sum(out.total, plan, self.dim)
        # Modular clipping check: coordinates near the ends of the ring may have wrapped (accuracy, not privacy).
        centered = np.abs(from_ring(out.total, self.cfg.bits).astype(np.float64))
        summary["edge_fraction"] = float(np.mean(centered > EDGE * 2.0 ** (self.cfg.bits - 1)))
        self.survivors_per_round.append(len(out.survivors))
        return unflatten(flatten(arrays) + total / self._denominator(len(out.survivors)), arrays)

    def _denominator(self, survivors: int) -> float:
        if self.plan is None:
            return float(survivors)
        if self.dp.client_sampling == "poisson":
            return self.fraction * self.num_clients  # the expected count: the estimator sum/(qN)
        return float(self.expected)

    @staticmethod
    def _payload(reply: Message, record: RoundRecord, cid: str) -> dict[str, Any]:
        if reply.has_error():
            return {"error": reply.error.reason}
        content = reply.content
        if (privacy := content.config_records.get("privacy")) is not None:
            record.privacy.append({"client_id": cid, **dict(privacy)})
        meta = content.config_records.get("meta")
        if meta is not None and "refused" in meta:
            record.refused.append({"client_id": cid, "reason": str(meta["refused"])})
            return {"error": f"refused: {meta['refused']}"}
        if STATE_KEY not in content.config_records:
            return {"error": "the reply carries no secagg record"}
        return dict(content.config_records[STATE_KEY])


def secure_rounds(grid: Grid, run_config: Mapping[str, Any], dp: DPConfig, model: torch.nn.Module,
                  tracker: PrivacyTracker | None) -> SecureRounds | None:
    """The secure train phase of a run, or None when `secagg` is off. Bad settings fail here, before training."""
    cfg = SecAggConfig.from_run_config(run_config)
    if not cfg.enabled:
        return None
    data_cfg, server_cfg = DataConfig.from_run_config(run_config), ServerConfig.from_run_config(run_config)
    if server_cfg.resume_from and "user" in dp.modes:
        raise ConfigError("resume-from is not supported with secagg and dp=user yet (the accountant needs every "
                          "round's survivors); start a fresh run")
    dim = sum(int(v.numel()) for v in model.state_dict().values())
    secure = SecureRounds(grid, cfg, dp, data_cfg.num_clients, server_cfg.fraction_train, server_cfg.seed, dim)
    if tracker is not None:
        tracker.secure = secure
    return secure
