"""The server's privacy record: privacy.json, rewritten after every round, and the reports at the end.

Sample level: each client sends its whole ledger with every reply (a refusal too). The server does not take
the client's epsilon on trust: it recomposes every client's history with its own accountant, and that is the
number written. User level: the server's own DP-FedAvg releases, accounted with amplification by sampling.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from privacy import (
    SCHEMA_VERSION,
    DPConfig,
    PrivacyLedger,
    compute_epsilon,
    library_versions,
    user_level_epsilons,
    write_privacy_record,
)

log = logging.getLogger("fedpriv")


@dataclass
class ClientPrivacy:
    ledger: PrivacyLedger
    settings: dict[str, Any]
    refused_rounds: list[int] = field(default_factory=list)


class PrivacyTracker:
    def __init__(self, out_dir: str | Path, dp: DPConfig, num_clients: int, fraction_train: float) -> None:
        self.path = Path(out_dir) / "privacy.json"
        self.dp, self.num_clients, self.fraction = dp, num_clients, fraction_train
        self.clients: dict[str, ClientPrivacy] = {}
        self.server_rounds = 0  # rounds released so far: each is one user-level (or local-DP) mechanism
        self.secure = None  # server.secagg.SecureRounds when secagg is on: adds its trust model and accounting

    def observe(self, server_round: int, privacy: list[dict[str, Any]], refused: list[dict[str, str]]) -> None:
        for entry in privacy:
            cid = str(entry["client_id"])
            ledger = PrivacyLedger.from_json(str(entry["ledger"]))
            known = self.clients.get(cid)
            # A client's ledger only grows; keep the longest one seen (a reply can arrive late or twice).
            if known is None or len(ledger.entries) >= len(known.ledger.entries):
                refused_rounds = known.refused_rounds if known else []
                self.clients[cid] = ClientPrivacy(ledger, entry, refused_rounds)
        for r in refused:
            if r["client_id"] in self.clients and server_round not in self.clients[r["client_id"]].refused_rounds:
                self.clients[r["client_id"]].refused_rounds.append(server_round)
        self.server_rounds = server_round

    def record(self) -> dict[str, Any]:
        record = {
            "schema_version": SCHEMA_VERSION,
            "delta": self.dp.delta,
            "sample_level": self._sample_level() if "sample" in self.dp.modes else None,
            "user_level": self._user_level() if "user" in self.dp.modes and self.secure is None else None,
            "local": self._local() if "local" in self.dp.modes else None,
            "library_versions": library_versions(),
        }
        if self.secure is not None:
            from server.secagg_privacy import secure_sections

            record["secure_aggregation"], record["user_level"] = secure_sections(self.secure, self)
        return record

    def write(self) -> Path:
        write_privacy_record(self.path, self.record())
        return self.path

    def _sample_level(self) -> dict[str, Any]:
        clients = []
        for cid in sorted(self.clients, key=lambda c: (not c.isdigit(), int(c) if c.isdigit() else 0, c)):
            c = self.clients[cid]
            history = c.ledger.history()
            # Recomposed here, prefix by prefix, by the server's own accountant: not the client's word.
            per_round = [compute_epsilon(history[: i + 1], self.dp.delta, self.dp.accountant)
                         for i in range(len(history))]
            reported = c.ledger.entries[-1]["epsilon_after"] if c.ledger.entries else 0.0
            if per_round and abs(per_round[-1] - reported) > 1e-6 * max(1.0, reported):
                log.warning("client %s reports epsilon %.6f, its history composes to %.6f; recording the latter",
                            cid, reported, per_round[-1])
            last = c.ledger.entries[-1] if c.ledger.entries else {}
            budget_eps = float(c.settings.get("budget-epsilon", 0.0))
            clients.append({
                "client_id": cid,
                "num_examples": int(c.settings["num-examples"]),
                "noise_multiplier": float(last.get("noise_multiplier", c.settings["noise-multiplier"])),
                "max_grad_norm": float(c.settings["max-grad-norm"]),
                "sample_rate": float(last.get("sample_rate", c.settings["sample-rate"])),
                "rounds": c.ledger.rounds(),
                "steps_per_round": [int(e["steps"]) for e in c.ledger.entries],
                "epsilon_per_round": per_round,
                "epsilon": per_round[-1] if per_round else 0.0,
                "budget": ({"epsilon": budget_eps, "delta": float(c.settings["budget-delta"])}
                           if budget_eps > 0 else None),
                "refused_rounds": sorted(c.refused_rounds),
                # which DP-SGD implementation ran (bk, or the Opacus mode it fell back to); older clients omit it
                **({"grad_sample_mode": str(c.settings["grad-sample-mode"])}
                   if "grad-sample-mode" in c.settings else {}),
            })
        return {"accountant": self.dp.accountant, "clients": clients}

    def _user_level(self) -> dict[str, Any]:
        curves = user_level_epsilons(self.dp.user_noise_multiplier, self.dp.client_sampling, self.server_rounds,
                                     self.dp.delta, num_clients=self.num_clients, sample_rate=self.fraction)
        rdp, pld = curves["rdp"], curves["pld"]
        return {
            "accountant": "rdp",
            "noise_multiplier": self.dp.user_noise_multiplier,
            "clipping_norm": self.dp.user_clipping_norm,
            "clipping": self.dp.user_clipping,
            "client_sampling": self.dp.client_sampling,
            "client_sampling_rate": self.fraction,
            "num_clients": self.num_clients,
            "epsilon_per_round": rdp,
            "epsilon": rdp[-1] if rdp else 0.0,
            "epsilon_pld": (pld[-1] if pld else None),
        }

    def _local(self) -> dict[str, Any]:
        """Flower's LocalDpMod gives (epsilon, delta) per released update; over R rounds basic composition
        gives (R*epsilon, R*delta) for a client that took part in all of them."""
        r = self.server_rounds
        return {"epsilon_per_round": self.dp.local_epsilon, "delta_per_round": self.dp.delta, "rounds": r,
                "epsilon_composed": r * self.dp.local_epsilon, "delta_composed": r * self.dp.delta,
                "sensitivity": self.dp.local_sensitivity, "clipping_norm": self.dp.max_grad_norm,
                "composition": "basic (sequential) composition over rounds"}
