"""The client's side of SecAgg+ (Bell et al., 2020), over four Flower custom actions.

  query.secagg_setup    fresh key pairs for this round (c: encrypts shares, s: agrees pairwise masks), a
                        self-mask seed b; replies with the public keys and a hash committing to b.
  query.secagg_share    Shamir-shares s's private scalar and b among its neighbours (itself included), each
                        share sealed for its holder with a key agreed from c.
  train.secagg_collect  trains as a plain round would, encodes the update into Z_{2^bits} (quantized, or
                        clipped + rotated + noised for distributed DP) and replies with it masked.
  query.secagg_unmask   for each neighbour the server says survived, its share of b; for each it says dropped,
                        its share of s. Never both for one node: a node answers one unmask per round.

The protocol itself (`respond`) is a pure function of (stage, request, state), so it is tested without Flower;
the handlers below only move ConfigRecords. State between stages lives in `context.state["secagg"]`.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from common.secagg_crypto import (
    MAX_BITS,
    MIN_BITS,
    SecAggError,
    agree,
    mask_seed,
    masked_input,
    new_key_pair,
    open_sealed,
    private_scalar,
    seal,
    split_secret,
)

STAGES = ("setup", "share", "collect", "unmask")
STATE_KEY = "secagg"
Encoder = Callable[[dict[str, Any]], np.ndarray]  # the collect request -> this client's vector in Z_{2^bits}


def respond(stage: str, request: dict[str, Any], state: dict[str, Any],
            encode: Encoder | None = None) -> dict[str, Any]:
    """One protocol step: checks the request against what this node agreed to, updates `state` in place and
    returns the reply payload. Raises SecAggError (one line) on a request it must not answer."""
    if stage not in STAGES:
        raise SecAggError(f"unknown secagg stage {stage!r}")
    rnd = int(request.get("round", -1))
    if stage == "setup":
        return _setup(rnd, request, state)
    if state.get("round") != rnd:
        raise SecAggError(f"request for round {rnd} at stage {stage}, but this node set up round {state.get('round')}")
    expected = STAGES[STAGES.index(stage) - 1]
    if state.get("stage") != expected:
        raise SecAggError(f"request for stage {stage} after stage {state.get('stage')}; expected it after {expected}")
    if stage == "share":
        reply = _share(rnd, request, state)
    elif stage == "collect":
        if encode is None:
            raise SecAggError("collect needs an encoder for this node's update")
        reply = _collect(rnd, request, state, encode)
    else:
        reply = _unmask(rnd, request, state)
    state["stage"] = stage
    return reply


def _setup(rnd: int, request: dict[str, Any], state: dict[str, Any]) -> dict[str, Any]:
    me, threshold, bits = int(request["me"]), int(request["threshold"]), int(request["bits"])
    neighbours = [int(n) for n in request["neighbours"]]
    if me in neighbours:
        raise SecAggError("the server listed this node as its own neighbour")
    if not 2 <= threshold <= len(neighbours) + 1:
        raise SecAggError(f"threshold {threshold} is not in 2..{len(neighbours) + 1} (this node's share holders)")
    if not MIN_BITS <= bits <= MAX_BITS:
        raise SecAggError(f"bits {bits} is not in {MIN_BITS}..{MAX_BITS}")
    sk_c, pk_c = new_key_pair()
    sk_s, pk_s = new_key_pair()
    self_seed = os.urandom(32)  # secret from the server: OS entropy, never the run seed
    state.clear()
    state.update({"round": rnd, "stage": "setup", "me": me, "neighbours": neighbours, "threshold": threshold,
                  "bits": bits, "sk-c": sk_c, "sk-s": sk_s, "self-seed": self_seed})
    return {"pk-c": pk_c, "pk-s": pk_s, "seed-hash": hashlib.sha256(self_seed).digest()}


def _share(rnd: int, request: dict[str, Any], state: dict[str, Any]) -> dict[str, Any]:
    peers = [int(n) for n in request["nodes"]]
    stray = sorted(set(peers) - set(state["neighbours"]))
    if stray:
        raise SecAggError(f"the server sent keys of node {stray[0]}, which is not this node's neighbour")
    if len(peers) + 1 < state["threshold"]:
        raise SecAggError(f"{len(peers)} neighbours left, too few for threshold {state['threshold']}")
    holders = [state["me"], *peers]
    sk_shares = split_secret(private_scalar(state["sk-s"]), state["threshold"], len(holders))
    b_shares = split_secret(state["self-seed"], state["threshold"], len(holders))
    cts, keys = [], []
    for peer, pk_c, sk_share, b_share in zip(peers, request["pk-c"], sk_shares[1:], b_shares[1:], strict=True):
        payload = {"src": state["me"], "dst": peer, "round": rnd, "sk": sk_share.hex(), "b": b_share.hex()}
        keys.append(agree(state["sk-c"], pk_c))  # kept: unmask opens the peer's shares with the same key
        cts.append(seal(keys[-1], payload))
    state.update({"peers": peers, "peer-keys": keys, "peer-pk-s": list(request["pk-s"]),
                  "own-sk-share": sk_shares[0], "own-b-share": b_shares[0]})
    return {"dst": peers, "ct": cts}


def _collect(rnd: int, request: dict[str, Any], state: dict[str, Any], encode: Encoder) -> dict[str, Any]:
    u2 = [int(n) for n in request["nodes"]]
    src = [int(n) for n in request["src"]]
    stray = sorted(set(u2) - set(state["peers"]))
    if stray:
        raise SecAggError(f"the server lists node {stray[0]} as a survivor, but it got no keys of it at share")
    if sorted(src) != sorted(u2):
        raise SecAggError("the shares forwarded do not come from exactly the neighbours listed as survivors")
    if len(u2) + 1 < state["threshold"]:
        raise SecAggError(f"{len(u2)} neighbours survive, too few for threshold {state['threshold']}")
    pk_s = dict(zip(state["peers"], state["peer-pk-s"], strict=True))
    seeds = {peer: mask_seed(agree(state["sk-s"], pk_s[peer])) for peer in u2}
    values = encode(request)
    masked = masked_input(values, state["bits"], state["self-seed"], seeds, state["me"])
    state.update({"u2": u2, "src": src, "ct": list(request["ct"])})
    dtype = "<u4" if state["bits"] <= 32 else "<u8"
    return {"masked": masked.astype(dtype).tobytes(), "length": len(values)}


def _unmask(rnd: int, request: dict[str, Any], state: dict[str, Any]) -> dict[str, Any]:
    alive = [int(n) for n in request["alive"]]
    dropped = [int(n) for n in request["dropped"]]
    me, u2 = state["me"], set(state["u2"])
    if set(alive) & set(dropped):
        raise SecAggError("the server lists a node as both alive and dropped: answering would unmask it")
    if me not in alive or me in dropped:
        raise SecAggError("the server lists this node as dropped although it is asked to answer")
    stray = sorted((set(alive) | set(dropped)) - u2 - {me})
    if stray:
        raise SecAggError(f"the server asks for a share of node {stray[0]}, which holds none for this node")
    shares = dict(zip(state["src"], state["ct"], strict=True))
    nodes, kinds, out = [], [], []
    for node in alive + dropped:
        kind = "b" if node in alive else "sk"
        if node == me:
            share = state["own-b-share"]
        else:
            payload = open_sealed(_key_of(state, node), shares[node])
            if (payload["src"], payload["dst"], payload["round"]) != (node, me, rnd):
                raise SecAggError(f"the share from node {node} was sealed for another node or round")
            share = bytes.fromhex(payload[kind])
        nodes.append(node)
        kinds.append(kind)
        out.append(share)
    return {"nodes": nodes, "kinds": kinds, "shares": out}


def _key_of(state: dict[str, Any], node: int) -> bytes:
    return dict(zip(state["peers"], state["peer-keys"], strict=True))[node]


# --- Flower wiring -----------------------------------------------------------------------------------------

def _load_state(context: Context) -> dict[str, Any]:
    record = context.state.config_records.get(STATE_KEY)
    return {k: (list(v) if isinstance(v, list) else v) for k, v in record.items()} if record is not None else {}


def _save_state(context: Context, state: dict[str, Any]) -> None:
    context.state[STATE_KEY] = ConfigRecord(state)


def _reply(msg: Message, stage: str, payload: dict[str, Any], extra: RecordDict | None = None) -> Message:
    content = extra if extra is not None else RecordDict()
    rnd = int(msg.content.config_records[STATE_KEY]["round"])
    content[STATE_KEY] = ConfigRecord({**payload, "stage": stage, "round": rnd})
    return Message(content, reply_to=msg)


def _handler(stage: str) -> Callable[[Message, Context], Message]:
    def handle(msg: Message, context: Context) -> Message:
        state = _load_state(context)
        request = dict(msg.content.config_records[STATE_KEY])
        payload = respond(stage, request, state)
        _save_state(context, state)
        return _reply(msg, stage, payload)

    return handle


def register(app: ClientApp, train_fn: Callable[[Message, Context], Message]) -> None:
    """Adds the four SecAgg actions to fedpriv's ClientApp. `train_fn` is the plain train handler: collect
    runs it (DP-SGD, ledger and guard included), then sends the encoded, masked update instead of weights."""
    from common.secagg_codec import encode_update

    app.query("secagg_setup")(_handler("setup"))
    app.query("secagg_share")(_handler("share"))
    app.query("secagg_unmask")(_handler("unmask"))

    @app.train("secagg_collect")
    def collect(msg: Message, context: Context) -> Message:
        state = _load_state(context)
        request = dict(msg.content.config_records[STATE_KEY])
        trained: dict[str, Message] = {}

        def encode(req: dict[str, Any]) -> np.ndarray:
            # Train only once the request checked out: a bad request costs no privacy budget.
            reply = train_fn(msg, context)  # it reads only the arrays and the round's config
            trained["reply"] = reply
            meta = reply.content.config_records.get("meta") if reply.has_content() else None
            if reply.has_error() or (meta is not None and "refused" in meta):
                raise _Refused()
            # Rounding randomness only needs to be unbiased, so it is seeded; the noise is not (see codec).
            seed = int(np.random.SeedSequence([int(req["round"]), int(state["me"])]).generate_state(1)[0])
            return encode_update(msg.content["arrays"], reply.content["arrays"], req, seed)

        try:
            payload = respond("collect", request, state, encode)
        except _Refused:
            # A refusal (the owner's budget guard) goes back as the plain train handler wrote it: no update.
            _save_state(context, state)
            return trained["reply"]
        _save_state(context, state)
        plain = trained["reply"].content
        extra = RecordDict({k: v for k, v in plain.items() if k != "arrays"})  # metrics, meta, privacy ledger
        return _reply(msg, "collect", payload, extra)


class _Refused(Exception):
    """The plain train handler refused (or failed): nothing is masked or sent."""
