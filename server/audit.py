"""The server's side of an audit run (run config audit-canaries > 0): what an honest-but-curious server sees.

Sample level: the host client's DP-SGD carries the gradient canaries (client/app.py); the server scores each
canary by its coordinate's movement (times its sign) in the update the host sends, summed over rounds.
User level: m canary clients take part in DP-FedAvg like real clients (Poisson-sampled at the same rate, the
same clipping and noise); each is scored by the inner product of its direction with the sum of the released
noisy aggregates. Their contribution is then taken out of the model the run keeps (server/userdp.py).
Local DP: m canary clients whose updates go through the clients' own LocalDpMod each round (LocalCanaries).
The scores and the inclusion flags go to canaries.json in the run folder; privacy/audit.py turns them into
a bound.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from privacy import DPConfig, PrivacyError
from privacy.canaries import client_direction, gradient_canaries, inclusion, sampled_clients
from privacy.files import write_atomic
from server.rounds import client_id_of

SCORES_FILE = "canaries.json"


class SampleCanaryScores:
    """Scores gradient canaries from the host client's updates."""

    level = "sample"

    def __init__(self, dp: DPConfig, sizes: list[tuple[str, int]]) -> None:
        self.dp = dp
        specs = gradient_canaries(sizes, dp.audit_canaries, dp.audit_seed)
        self.included = np.array([c.included for c in specs])
        self.scores = np.zeros(len(specs))
        self.rounds: list[int] = []
        self.grad_sample_mode = ""  # what the host's DP-SGD ran (bk, or an Opacus mode), from its replies
        # Grouped by parameter: one fancy-index read per parameter and reply.
        self._by_name: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        for name in {c.name for c in specs}:
            js = np.array([j for j, c in enumerate(specs) if c.name == name])
            self._by_name[name] = (js, np.array([specs[j].index for j in js]), np.array([specs[j].sign for j in js]))

    def observe(self, server_round: int, replies: list[Message], arrays: ArrayRecord) -> None:
        for reply in replies:
            if client_id_of(reply) != self.dp.audit_host:
                continue
            privacy = reply.content.config_records.get("privacy")
            if privacy is not None and "grad-sample-mode" in privacy:
                self.grad_sample_mode = str(privacy["grad-sample-mode"])
            new = reply.content["arrays"]
            for name, (js, idx, sign) in self._by_name.items():
                moved = new[name].numpy().ravel()[idx].astype(float) - arrays[name].numpy().ravel()[idx]
                self.scores[js] += sign * moved
            self.rounds.append(server_round)

    def record(self) -> dict[str, Any]:
        return {"level": self.level, "host": self.dp.audit_host, "grad_sample_mode": self.grad_sample_mode,
                "rounds": self.rounds, "included": self.included.tolist(), "scores": self.scores.tolist()}


class UserCanaries:
    """Canary clients of user-level DP-FedAvg: their replies each round, and their scores at the end."""

    level = "user"

    def __init__(self, dp: DPConfig, arrays: ArrayRecord, sample_rate: float) -> None:
        if dp.client_sampling != "poisson":
            raise PrivacyError("a user-level audit samples its canary clients like real ones, by Poisson sampling; "
                               "audit a run with client-sampling=poisson")
        self.dp, self.rate = dp, sample_rate
        self.m, self.seed = dp.audit_canaries, dp.audit_seed
        self.included = inclusion(self.m, self.seed)
        self.keys = list(arrays.keys())
        self.shapes = [a.shape for a in arrays.to_numpy_ndarrays()]
        self.size = int(sum(np.prod(s) for s in self.shapes))
        self.released = np.zeros(self.size)  # sum over rounds of the released (noisy) model deltas
        self.rounds: list[int] = []
        self.sampled: list[list[int]] = []

    def _flat(self, arrays: list[np.ndarray]) -> np.ndarray:
        return np.concatenate([a.ravel().astype(float) for a in arrays])

    def replies(self, server_round: int, arrays: ArrayRecord, template: Message) -> list[Message]:
        """Updates of the included canary clients Poisson-sampled into this round: C times their direction.
        Their metrics are a real reply's (`template`): Flower aggregates only records with equal keys, and
        DP-FedAvg's aggregated metrics are not used (server/userdp.py)."""
        chosen = [int(j) for j in sampled_clients(self.m, self.rate, self.seed, server_round) if self.included[j]]
        self.sampled.append(chosen)
        old = arrays.to_numpy_ndarrays()
        out = []
        for j in chosen:
            step = self.dp.user_clipping_norm * client_direction(j, self.size, self.seed)
            parts, start = {}, 0
            for key, a in zip(self.keys, old, strict=True):
                parts[key] = Array(np.asarray(a + step[start:start + a.size].reshape(a.shape), dtype=a.dtype))
                start += a.size
            content = RecordDict({"arrays": ArrayRecord(parts),
                                  "metrics": MetricRecord(dict(template.content["metrics"])),
                                  "meta": ConfigRecord({"client-id": f"canary-{j}"})})
            out.append(Message(content, dst_node_id=0, message_type="train"))
        return out

    def observe(self, server_round: int, old: list[np.ndarray], released: list[np.ndarray]) -> None:
        self.released += self._flat(released) - self._flat(old)
        self.rounds.append(server_round)

    def record(self) -> dict[str, Any]:
        scores = [float(client_direction(j, self.size, self.seed) @ self.released) for j in range(self.m)]
        return {"level": self.level, "host": "server (canary clients)", "sample_rate": self.rate,
                "rounds": self.rounds, "included": self.included.tolist(), "scores": scores}


class LocalCanaries:
    """Canary clients under local DP: every round each sends its update through the same LocalDpMod the real
    clients use (common.local_dp): C times its direction if included, (almost) no change if not (the neighbour).
    Score: the inner product of the privatized update with the direction, summed over rounds. The canaries
    take part in every round and never enter the aggregate."""

    level = "local"

    def __init__(self, dp: DPConfig, run_config: dict[str, Any], arrays: ArrayRecord) -> None:
        self.dp, self.run_config = dp, dict(run_config)
        self.m, self.seed = dp.audit_canaries, dp.audit_seed
        self.included = inclusion(self.m, self.seed)
        self.size = int(sum(a.size for a in arrays.to_numpy_ndarrays()))
        self.scores = np.zeros(self.m)
        self.rounds: list[int] = []

    def observe(self, server_round: int, _replies: list[Message], arrays: ArrayRecord) -> None:
        from flwr.app import Context

        from common.local_dp import local_dp

        context = Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config=self.run_config)
        old = arrays.to_numpy_ndarrays()
        flat_old = np.concatenate([a.ravel().astype(float) for a in old])
        # LocalDpMod draws from numpy's global generator; seeding it per round makes audits reproducible.
        np.random.seed([self.seed, 5, server_round])
        for j in range(self.m):
            u = client_direction(j, self.size, self.seed)
            # Not included: (almost) no change. Flower's clipping divides by the update's norm (zero fails), so
            # the neighbour moves by 1e-4 C along the same direction: the pair is at distance < C, never more.
            step = self.dp.max_grad_norm * (u if self.included[j] else 1e-4 * u)
            parts, start = {}, 0
            for key, a in zip(arrays.keys(), old, strict=True):
                parts[key] = Array(np.asarray(a + step[start:start + a.size].reshape(a.shape), dtype=a.dtype))
                start += a.size
            msg = Message(RecordDict({"arrays": arrays}), dst_node_id=0, message_type="train")
            reply = Message(RecordDict({"arrays": ArrayRecord(parts)}), dst_node_id=0, message_type="train")
            out = local_dp(msg, context, lambda _m, _c, r=reply: r)
            sent = np.concatenate([a.ravel().astype(float) for a in out.content["arrays"].to_numpy_ndarrays()])
            self.scores[j] += float(u @ (sent - flat_old))
        self.rounds.append(server_round)

    def record(self) -> dict[str, Any]:
        return {"level": self.level, "host": "server (canary clients through LocalDpMod)", "rounds": self.rounds,
                "included": self.included.tolist(), "scores": self.scores.tolist()}


def build_auditor(dp: DPConfig, model: Any, arrays: ArrayRecord, fraction_train: float,
                  run_config: dict[str, Any] | None = None) -> SampleCanaryScores | UserCanaries | LocalCanaries | None:
    """The run's auditor, or None when it is no audit run. `model`: the torch module whose named_parameters
    the clients' canaries are drawn over (the same names and sizes, hence the same coordinates)."""
    if not dp.audit_canaries:
        return None
    if "sample" in dp.modes:
        return SampleCanaryScores(dp, [(name, p.numel()) for name, p in model.named_parameters()])
    if "user" in dp.modes:
        return UserCanaries(dp, arrays, fraction_train)
    return LocalCanaries(dp, run_config or {}, arrays)


def write_scores(out_dir: str | Path, auditor: SampleCanaryScores | UserCanaries | LocalCanaries) -> Path:
    path = Path(out_dir) / SCORES_FILE
    record = {"canaries": int(len(auditor.included)), "seed": auditor.dp.audit_seed, **auditor.record()}
    write_atomic(path, (json.dumps(record, indent=1) + "\n").encode("utf-8"))
    return path
