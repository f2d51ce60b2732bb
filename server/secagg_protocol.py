"""The server's side of SecAgg+: four stages over any transport, dropouts tolerated at each, and either the
exact sum of the survivors' inputs or nothing at all.

  U1 = nodes that sent keys at setup;  U2 = those whose shares went out;  U3 = those whose masked input
  arrived and checked out;  U4 = those that answered the unmask stage with shares.
A node lost before its shares went out (not in U2) is excluded before anyone masks with it. A node lost
after (in U2, not in U3) is unmasked from its neighbours' shares of its mask key; its input is not in the
sum. Each survivor's self mask is rebuilt from its neighbours' shares. The round releases nothing when fewer
than `threshold` nodes reach U3, or when any needed secret cannot be rebuilt from `threshold` shares.

The server never holds an individual input unmasked: it only ever adds masked vectors, then removes masks.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from common.secagg_crypto import (
    SecAggError,
    agree,
    is_public_key,
    join_shares,
    mask_seed,
    neighbour_graph,
    private_from_scalar,
    public_of,
    same_public_key,
    unmask,
)

log = logging.getLogger("fedpriv")

# stage, {node: request payload} -> {node: reply payload}; a node that did not answer is absent, a node that
# failed maps to {"error": reason}.
Transport = Callable[[str, dict[int, dict[str, Any]]], dict[int, dict[str, Any]]]


@dataclass(frozen=True)
class ProtocolSettings:
    shares: int  # share holders per node, itself included (0 = every sampled node: plain SecAgg)
    threshold: int
    bits: int
    graph_seed: int


@dataclass
class Outcome:
    total: np.ndarray | None = None  # the modular sum of U3's inputs; None = nothing released
    survivors: list[int] = field(default_factory=list)  # U3, whose inputs are in the sum
    stage_reached: str = "setup"
    dropped: list[dict[str, Any]] = field(default_factory=list)  # {node, stage, reason}
    unmasked_from_shares: list[int] = field(default_factory=list)  # U2 \ U3, whose pair masks were rebuilt
    refused: str | None = None
    collect_replies: dict[int, dict[str, Any]] = field(default_factory=dict)

    def drop(self, node: int, stage: str, reason: str) -> None:
        log.warning("secagg: dropped node %s at %s: %s", node, stage, reason)
        self.dropped.append({"node": node, "stage": stage, "reason": reason})


def run_protocol(rnd: int, nodes: list[int], settings: ProtocolSettings, transport: Transport,
                 collect_plan: dict[str, Any], length: int) -> Outcome:
    """One SecAgg+ aggregation among `nodes`; `collect_plan` goes to every node with the collect request,
    `length` is the number of values each masked input must hold."""
    out = Outcome()
    t = settings.threshold
    graph = neighbour_graph(sorted(nodes), settings.shares, settings.graph_seed)

    def live(stage: str, requests: dict[int, dict[str, Any]], check: Callable[[int, dict[str, Any]], str | None]):
        replies = transport(stage, requests)
        good = {}
        for node in sorted(requests):
            reply = replies.get(node)
            problem = "no reply before the stage timed out" if reply is None else _envelope(reply, stage, rnd)
            problem = problem or check(node, reply)
            if problem:
                out.drop(node, stage, problem)
            else:
                good[node] = reply
        return good

    # Stage 0: keys.
    out.stage_reached = "setup"
    setup = {n: {"round": rnd, "me": n, "neighbours": graph[n], "threshold": t, "bits": settings.bits}
             for n in nodes}
    keys = live("setup", setup, _check_keys)
    if _too_few(out, keys, t, "setup"):
        return out
    # Stage 1: shares, sealed for their holders; the server only routes them.
    out.stage_reached = "share"
    share_req = {}
    for n in keys:
        peers = [p for p in graph[n] if p in keys]
        share_req[n] = {"round": rnd, "nodes": peers, "pk-c": [keys[p]["pk-c"] for p in peers],
                        "pk-s": [keys[p]["pk-s"] for p in peers]}
    shared = live("share", share_req, lambda n, r: _check_shares(n, r, share_req[n]["nodes"]))
    if _too_few(out, shared, t, "share"):
        return out
    inbox: dict[int, dict[int, bytes]] = {n: {} for n in shared}
    for src, reply in shared.items():
        for dst, ct in zip(reply["dst"], reply["ct"], strict=True):
            if int(dst) in inbox:
                inbox[int(dst)][src] = ct
    # Stage 2: masked inputs. Each node masks with exactly its neighbours in U2.
    out.stage_reached = "collect"
    collect_req = {}
    for n in shared:
        peers = sorted(inbox[n])
        collect_req[n] = {**collect_plan, "round": rnd, "nodes": peers, "src": peers,
                          "ct": [inbox[n][p] for p in peers]}
    itemsize = 4 if settings.bits <= 32 else 8
    masked = live("collect", collect_req, lambda n, r: _check_masked(r, length, itemsize, settings.bits))
    if _too_few(out, masked, t, "collect"):
        return out
    out.collect_replies = masked
    u2, u3 = set(shared), set(masked)
    # Stage 3: shares of b for survivors, of the mask key for nodes lost after their shares went out.
    out.stage_reached = "unmask"
    unmask_req = {n: {"round": rnd, "alive": sorted({n} | (set(graph[n]) & u3)),
                      "dropped": sorted((set(graph[n]) & u2) - u3)} for n in masked}
    answers = live("unmask", unmask_req, lambda n, r: _check_unmask(r, unmask_req[n]))
    b_shares: dict[int, list[bytes]] = {}
    sk_shares: dict[int, list[bytes]] = {}
    for reply in answers.values():
        for node, kind, share in zip(reply["nodes"], reply["kinds"], reply["shares"], strict=True):
            (b_shares if kind == "b" else sk_shares).setdefault(int(node), []).append(share)
    try:
        seeds = {n: _rebuild_seed(n, b_shares.get(n, []), t, keys[n]["seed-hash"]) for n in sorted(u3)}
        orphans = {}
        for d in sorted(u2 - u3):
            alive = [a for a in graph[d] if a in u3]
            if not alive:
                continue
            sk = _rebuild_key(d, sk_shares.get(d, []), t, keys[d]["pk-s"])
            for a in alive:
                orphans[(a, d)] = mask_seed(agree(sk, keys[a]["pk-s"]))
    except SecAggError as exc:
        out.refused = str(exc)
        log.warning("secagg round %d: nothing released: %s", rnd, exc)
        return out
    vectors = {n: _as_ring(masked[n]["masked"], itemsize) for n in sorted(u3)}
    out.total = unmask(vectors, settings.bits, seeds, orphans)
    out.survivors = sorted(u3)
    out.unmasked_from_shares = sorted({d for _, d in orphans})
    out.stage_reached = "released"
    return out


def _too_few(out: Outcome, live: dict[int, Any], t: int, stage: str) -> bool:
    if len(live) >= t:
        return False
    out.refused = f"only {len(live)} nodes left after {stage}, fewer than the threshold {t}: nothing released"
    log.warning("secagg: %s", out.refused)
    return True


def _envelope(reply: dict[str, Any], stage: str, rnd: int) -> str | None:
    if "error" in reply:
        return f"client failed: {str(reply['error']).splitlines()[0]}"
    if reply.get("stage") != stage or reply.get("round") != rnd:
        return f"reply for stage {reply.get('stage')!r} round {reply.get('round')!r}, expected {stage!r} round {rnd}"
    return None


def _check_keys(node: int, reply: dict[str, Any]) -> str | None:
    for key in ("pk-c", "pk-s"):
        if not is_public_key(reply.get(key)):
            return f"{key} is not a public key"
    if not isinstance(reply.get("seed-hash"), bytes) or len(reply["seed-hash"]) != 32:
        return "seed-hash is not a 32-byte hash"
    if reply["pk-c"] == reply["pk-s"]:
        return "the same key was sent for encryption and masking"
    return None


def _check_shares(node: int, reply: dict[str, Any], peers: list[int]) -> str | None:
    dst = [int(d) for d in reply.get("dst", [])]
    stray = sorted(set(dst) - set(peers))
    if stray:
        return f"share for node {stray[0]}, which is not its neighbour"
    if sorted(dst) != sorted(peers) or len(reply.get("ct", [])) != len(dst):
        return "not exactly one share for each live neighbour"
    return None


def _check_masked(reply: dict[str, Any], length: int, itemsize: int, bits: int) -> str | None:
    raw = reply.get("masked")
    if not isinstance(raw, bytes) or len(raw) != length * itemsize or int(reply.get("length", -1)) != length:
        got = len(raw) // itemsize if isinstance(raw, bytes) else "no"
        return f"masked input has {got} values, expected {length}"
    values = _as_ring(raw, itemsize)
    if bits < 8 * itemsize and int(values.max(initial=0)) >= (1 << bits):
        return f"masked input holds values outside Z_2^{bits}"
    return None


def _check_unmask(reply: dict[str, Any], request: dict[str, Any]) -> str | None:
    asked = {(n, "b") for n in request["alive"]} | {(n, "sk") for n in request["dropped"]}
    nodes, kinds, shares = reply.get("nodes", []), reply.get("kinds", []), reply.get("shares", [])
    if not (len(nodes) == len(kinds) == len(shares)):
        return "unmask reply lists are of different lengths"
    given = {(int(n), k) for n, k in zip(nodes, kinds, strict=True)}
    if given - asked:
        node, kind = sorted(given - asked)[0]
        return f"sent a {kind} share of node {node}, which was not asked for"
    return None


def _as_ring(raw: bytes, itemsize: int) -> np.ndarray:
    return np.frombuffer(raw, dtype="<u4" if itemsize == 4 else "<u8").astype(np.uint64)


def _rebuild_seed(node: int, shares: list[bytes], t: int, seed_hash: bytes) -> bytes:
    if len(shares) < t:
        raise SecAggError(f"only {len(shares)} shares of node {node}'s self mask, fewer than the threshold {t}")
    seed = join_shares(shares[:t])
    if hashlib.sha256(seed).digest() != seed_hash:
        raise SecAggError(f"the shares of node {node}'s self mask rebuild a seed that does not match its commitment")
    return seed


def _rebuild_key(node: int, shares: list[bytes], t: int, public_pem: bytes) -> bytes:
    if len(shares) < t:
        raise SecAggError(f"only {len(shares)} shares of dropped node {node}'s mask key, fewer than the threshold {t}")
    try:
        private = private_from_scalar(join_shares(shares[:t]))
    except ValueError:
        raise SecAggError(f"the shares of node {node}'s mask key do not rebuild a key") from None
    if not same_public_key(public_of(private), public_pem):
        raise SecAggError(f"the shares of node {node}'s mask key rebuild a key that does not match its public key")
    return private
