"""fedpriv's round loop around a Flower strategy.

Flower's `Strategy.start` runs rounds 1..R with its own node sampling. fedpriv keeps Flower's strategies for
everything they do (configure, aggregate) but runs the loop itself, because it needs what `start` cannot give:
sampling by client id from a seeded generator (the same clients on every engine, and a resumed run samples
what an uninterrupted one would), Poisson client sampling for user-level DP, checks that drop a bad update
instead of failing the round, refusals from a client's budget guard, and a record written after every round.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from common.arrays import pack_arrays, unpack_arrays
from common.compression import decompress_reply
from common.messages import get_record
from server.aggregation import Accumulator, AccumulatorFactory, InOrder
from server.checks import update_problem

log = logging.getLogger("fedpriv")

QUERY = "query"
# Between pulls for replies. Flower's HttpGrid.send_and_receive sleeps 3 s, a floor of 3 s on every message
# phase of a deployed round (two a round); a pull to the SuperLink is cheap next to that.
POLL_SECONDS = 0.2


def shorten_reply_object_waits() -> None:
    """In the ServerApp's process (Flower 1.41, pinned): HttpGrid pulls a reply's objects with a first retry
    after 1 s, and a reply listed a moment before its objects reached the SuperLink cost the round a second.
    The same short retries as the client's pulls (common/deploy_waits.py)."""
    import flwr.superlink.grid.http_grid as http_grid

    from common.deploy_waits import quick_retries

    http_grid.pull_objects = quick_retries(http_grid.pull_objects)


def exchange(grid: Grid, messages: Iterable[Message], timeout: float | None,
             poll_seconds: float = POLL_SECONDS, on_reply: Callable[[Message], None] | None = None,
             while_out: Callable[[], None] | None = None) -> list[Message]:
    """Grid.send_and_receive with a short poll: push every message, pull replies until all came or time ran out.
    Messages are pulled in the order pushed; `on_reply` sees each reply as it is pulled (the in-process
    engine runs a client's message only when its reply is pulled, so that is while its arrays are in cache).
    `while_out` runs once after the push, before the first pull: server work that the replies do not change
    overlaps the clients' (deployed, or on Ray) instead of following it. The timeout counts from the push."""
    messages = list(messages)
    if not messages:
        if while_out is not None:
            while_out()
        return []
    pending = dict.fromkeys(grid.push_messages(messages))  # ordered, unlike a set
    deadline = None if timeout is None else time.monotonic() + timeout
    if while_out is not None:
        while_out()
    replies: list[Message] = []
    while pending:
        asked, got = time.monotonic(), len(replies)
        for reply in grid.pull_messages(list(pending)):
            replies.append(reply)
            pending.pop(reply.metadata.reply_to_message_id, None)
            if on_reply is not None:
                on_reply(reply)
        now = time.monotonic()
        if not pending or (deadline is not None and now >= deadline):
            break
        if len(replies) == got and now - asked < poll_seconds:
            # Only an empty pull that came back at once waits here: fedpriv's SuperLink holds an empty pull
            # until a reply is stored (common/deploy_waits.py), and a pull that brought replies may have
            # more right behind it.
            time.sleep(poll_seconds)
    return replies


def client_id_of(reply: Message) -> str | None:
    meta = None if reply.has_error() else get_record(reply.content, "meta", ConfigRecord)
    return None if meta is None else str(meta.get("client-id"))


class ClientDirectory:
    """node id <-> client id. Client ids are the data owners' names; node ids change when a node reconnects."""

    def __init__(self) -> None:
        self.by_node: dict[int, str] = {}
        self._by_client: dict[str, int] = {}  # client id -> node id, checked against by_node on every use

    def refresh(self, grid: Grid, timeout: float) -> None:
        """Ask every node not yet known who it is (one `query` message each)."""
        live = set(grid.get_node_ids())
        self.by_node = {n: c for n, c in self.by_node.items() if n in live}
        unknown = sorted(live - set(self.by_node))
        if not unknown:
            return
        messages = [Message(RecordDict(), dst_node_id=n, message_type=QUERY) for n in unknown]
        known = {c: n for n, c in self.by_node.items()}
        for reply in exchange(grid, messages, timeout):
            cid = client_id_of(reply)
            if cid is not None:
                # A client that reconnects under a new node id replaces its old entry.
                if cid in known:
                    self.by_node.pop(known[cid], None)
                node = reply.metadata.src_node_id
                self.by_node[node] = cid
                known[cid] = node
        self._by_client = known

    def clients(self) -> list[str]:
        return sorted(self.by_node.values(), key=_client_sort_key)

    def node_of(self, client_id: str) -> int:
        # A reverse index, rebuilt when the directory changed: a scan per sampled client costs O(clients)
        # each, which at 10,000 clients and cohorts of 100 was a visible part of a round.
        node = self._by_client.get(client_id)
        if node is None or self.by_node.get(node) != client_id:
            self._by_client = {c: n for n, c in self.by_node.items()}
            node = self._by_client[client_id]
        return node


def _client_sort_key(client_id: str) -> tuple[int, Any]:
    # Numeric ids sort as numbers so that client "10" comes after "9".
    return (0, int(client_id)) if client_id.isdigit() else (1, client_id)


def sample_clients(clients: list[str], fraction: float, seed: int, server_round: int, purpose: str,
                   mode: str = "fixed", cap: int = 0) -> list[str]:
    """Seeded per (seed, round, purpose), so a resumed run samples exactly what an uninterrupted one would.
    A fixed sample takes at least one client, unless fraction is 0; cap > 0 bounds its size."""
    if fraction <= 0:
        return []
    rng = np.random.default_rng([seed, server_round, {"train": 0, "evaluate": 1}[purpose]])
    if mode == "poisson":
        return [c for c, u in zip(clients, rng.random(len(clients)), strict=True) if u < fraction]
    k = max(1, math.floor(len(clients) * fraction + 1e-9))
    if cap > 0:
        k = min(k, cap)
    chosen = rng.choice(len(clients), size=min(k, len(clients)), replace=False)
    return [clients[i] for i in sorted(chosen)]


class SubsetGrid(Grid):
    """A view of a Grid that shows only the sampled nodes, so a strategy configures exactly those."""

    def __init__(self, grid: Grid, node_ids: Iterable[int]) -> None:
        self._grid, self._nodes = grid, list(node_ids)

    def set_run(self, run) -> None:  # noqa: ANN001 - Flower's Run
        self._grid.set_run(run)

    @property
    def run(self):  # noqa: ANN201
        return self._grid.run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None) -> Message:  # noqa: ANN001
        return self._grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> list[int]:
        return list(self._nodes)

    def push_messages(self, messages):  # noqa: ANN001, ANN201
        return self._grid.push_messages(messages)

    def pull_messages(self, message_ids):  # noqa: ANN001, ANN201
        return self._grid.pull_messages(message_ids)

    def send_and_receive(self, messages, *, timeout=None):  # noqa: ANN001, ANN201
        return self._grid.send_and_receive(messages, timeout=timeout)


class PackedGrid(SubsetGrid):
    """A deployed grid whose messages carry each ArrayRecord as one Array (common.arrays.pack_arrays): a
    fraction of the HTTP requests per message on every hop. The ClientApp unpacks and packs its reply alike."""

    def __init__(self, grid: Grid) -> None:
        super().__init__(grid, [])

    def get_node_ids(self) -> list[int]:
        return list(self._grid.get_node_ids())

    def push_messages(self, messages):  # noqa: ANN001, ANN201
        return self._grid.push_messages(_packed(messages))

    def pull_messages(self, message_ids):  # noqa: ANN001, ANN201
        return _unpacked(self._grid.pull_messages(message_ids))

    def send_and_receive(self, messages, *, timeout=None):  # noqa: ANN001, ANN201
        return _unpacked(self._grid.send_and_receive(_packed(messages), timeout=timeout))


def _packed(messages: Iterable[Message]) -> list[Message]:
    messages, memo = list(messages), {}  # one memo: the round's shared global record is packed once
    for message in messages:
        pack_arrays(message.content, memo)
    return messages


def _unpacked(replies: Iterable[Message]) -> list[Message]:
    replies = list(replies)
    for reply in replies:
        _unpack_reply(reply)
    return replies


def _unpack_reply(reply: Message) -> None:
    if reply.has_error():
        return
    try:
        unpack_arrays(reply.content)
    except (ValueError, KeyError, TypeError) as exc:
        # Its arrays are dropped: the update checks then drop the reply as one without an update.
        log.warning("node %s sent a packed reply that does not unpack (%s); its update is dropped",
                    reply.metadata.src_node_id, exc)
        for name in list(reply.content.array_records):
            del reply.content[name]


def deployed(grid: Grid) -> bool:
    """True for the HttpGrid of a deployment (a SuperLink over HTTP). Its module is looked up, not imported: a
    grid of that class has loaded it already, and importing it (FastAPI and more, 0.6 s) would only lengthen
    every simulation's start-up."""
    http_grid = sys.modules.get("flwr.superlink.grid.http_grid")
    return http_grid is not None and isinstance(grid, http_grid.HttpGrid)


def packed_if_deployed(grid: Grid) -> Grid:
    """The ServerApp's grid: packed when it talks to a SuperLink over HTTP (a deployment); the simulation
    engines pass messages in memory, where packing would only copy."""
    return PackedGrid(grid) if deployed(grid) else grid


@dataclass
class LoopSettings:
    num_rounds: int
    fraction_train: float
    fraction_evaluate: float
    seed: int
    round_timeout: float
    client_sampling: str = "fixed"
    max_evaluate_clients: int = 0  # 0 = no cap
    min_clients: int = 1
    start_round: int = 1  # > 1 when resuming from a checkpoint


@dataclass
class RoundRecord:
    round: int
    sampled: list[str] = field(default_factory=list)
    train: list[dict[str, Any]] = field(default_factory=list)
    evaluate: list[dict[str, Any]] = field(default_factory=list)
    dropped: list[dict[str, str]] = field(default_factory=list)
    refused: list[dict[str, str]] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    server: dict[str, float] = field(default_factory=dict)
    privacy: list[dict[str, Any]] = field(default_factory=list)  # per-client ledger entries sent back with updates
    secagg: dict[str, Any] | None = None  # secure aggregation: stage reached, survivors, who was unmasked
    seconds: float = 0.0
    # Where the round's time went: the train exchange and aggregation; the evaluate exchange, push to last reply,
    # which includes the server's test ("server", its own duration) run while the clients evaluate.
    phase_seconds: dict[str, float] = field(default_factory=dict)
    # Bytes of model data the aggregated updates carried (client -> server), and what float weights would cost.
    upload_bytes: int = 0
    dense_bytes: int = 0

    def as_dict(self) -> dict[str, Any]:
        """For metrics.json; the privacy entries (whole client ledgers) go to privacy.json instead."""
        return {k: v for k, v in self.__dict__.items() if k != "privacy"}


def _metrics_of(reply: Message) -> dict[str, Any]:
    metrics = get_record(reply.content, "metrics", MetricRecord)
    return dict(metrics) if metrics is not None else {}


def _privacy_of(reply: Message) -> dict[str, Any] | None:
    privacy = get_record(reply.content, "privacy", ConfigRecord)
    return dict(privacy) if privacy is not None else None


def _sender(reply: Message, directory: ClientDirectory) -> str:
    return directory.by_node.get(reply.metadata.src_node_id, str(reply.metadata.src_node_id))


def _usable(reply: Message, cid: str, reference: ArrayRecord, record: RoundRecord, check_arrays: bool) -> bool:
    """Whether a reply can be used; a refused or dropped one is recorded with its reason. Privacy spent is
    recorded whatever becomes of the update: refused, dropped or aggregated."""
    if reply.has_content() and (privacy := _privacy_of(reply)) is not None:
        record.privacy.append({"client_id": cid, **privacy})
    meta = get_record(reply.content, "meta", ConfigRecord) if reply.has_content() else None
    if meta is not None and "refused" in meta:
        record.refused.append({"client_id": cid, "reason": str(meta["refused"])})
        return False
    # A compressed update is decoded to full weights first, so the checks and the strategy see weights.
    problem = (decompress_reply(reply, reference) or update_problem(reply, reference)) if check_arrays else (
        f"client failed: {reply.error.reason}" if reply.has_error() else None)
    if problem is not None:
        _drop(record, cid, problem)
        return False
    return True


def _drop(record: RoundRecord, cid: str, problem: str) -> None:
    log.warning("round %d: dropped the reply of client %s: %s", record.round, cid, problem)
    record.dropped.append({"client_id": cid, "reason": problem})


def _split_replies(replies: Iterable[Message], directory: ClientDirectory, reference: ArrayRecord,
                   record: RoundRecord, check_arrays: bool) -> list[Message]:
    """Keep the good replies (sorted by client id, so aggregation order never depends on arrival order)."""
    good = []
    for reply in replies:
        cid = _sender(reply, directory)
        if _usable(reply, cid, reference, record, check_arrays):
            good.append((cid, reply))
    good.sort(key=lambda pair: _client_sort_key(pair[0]))
    return [reply for _, reply in good]


class _Take:
    """What the round loop does with each train reply as it comes: check it and, with an accumulator, fold it
    in (in client order) while its arrays are in cache; otherwise keep it for the strategy."""

    def __init__(self, record: RoundRecord, directory: ClientDirectory, reference: ArrayRecord,
                 accumulator: Accumulator | None) -> None:
        self.record, self.directory, self.reference, self.accumulator = record, directory, reference, accumulator
        self.in_order = InOrder(record.sampled, accumulator) if accumulator is not None else None
        self.kept: list[tuple[str, Message]] = []

    def __call__(self, reply: Message) -> None:
        cid = _sender(reply, self.directory)
        usable = _usable(reply, cid, self.reference, self.record, check_arrays=True)
        if self.in_order is None:
            if usable:
                self.kept.append((cid, reply))
        elif (problem := self.in_order.offer(cid, reply if usable else None)) is not None:
            _drop(self.record, cid, problem)

    def good(self) -> list[Message]:
        """The usable replies in client order (all replies are in)."""
        if self.in_order is not None:
            self.in_order.finish()
            return self.in_order.good
        self.kept.sort(key=lambda pair: _client_sort_key(pair[0]))
        return [reply for _, reply in self.kept]


def _evaluate_on_server(record: RoundRecord, evaluate_fn: Callable[[int, ArrayRecord], dict[str, float]],
                        server_round: int, arrays: ArrayRecord) -> None:
    """The server's own test, run while the clients evaluate the same model: neither result depends on the other."""
    began = time.perf_counter()
    record.server = evaluate_fn(server_round, arrays)
    record.phase_seconds["server"] = round(time.perf_counter() - began, 4)


def run_rounds(
    grid: Grid,
    strategy: Strategy,
    arrays: ArrayRecord,
    settings: LoopSettings,
    evaluate_fn: Callable[[int, ArrayRecord], dict[str, float]],
    on_round: Callable[[RoundRecord, ArrayRecord], None],
    aggregate: Callable[[int, list[Message], ArrayRecord], ArrayRecord | None] | None = None,
    secure_train: Callable[[int, RoundRecord, ClientDirectory, ArrayRecord], ArrayRecord | None] | None = None,
    accumulate: AccumulatorFactory | None = None,
) -> ArrayRecord:
    """Run rounds start_round..num_rounds; after each, `on_round(record, arrays)` persists what happened.
    `aggregate(round, good_replies, current_arrays)` defaults to the strategy's own aggregate_train.
    `accumulate(round, current_arrays)`, when given instead, makes an accumulator that takes the good replies
    one at a time as they come, in client order (server/aggregation.py).
    `secure_train(round, record, directory, arrays)`, when given, replaces the whole train phase (secure
    aggregation: the server never holds one client's update) and returns the new arrays or None."""
    directory = ClientDirectory()
    aggregate = aggregate or (lambda r, replies, _arrays: strategy.aggregate_train(r, replies)[0])
    for server_round in range(settings.start_round, settings.num_rounds + 1):
        started = time.perf_counter()
        record = RoundRecord(round=server_round)
        directory.refresh(grid, settings.round_timeout)
        clients = directory.clients()
        if len(clients) < settings.min_clients:
            raise RuntimeError(
                f"round {server_round}: only {len(clients)} clients connected, min-clients is {settings.min_clients}")
        record.sampled = sample_clients(clients, settings.fraction_train, settings.seed, server_round, "train",
                                        settings.client_sampling)
        if record.sampled and secure_train is not None:
            arrays = secure_train(server_round, record, directory, arrays) or arrays
        elif record.sampled:
            nodes = [directory.node_of(c) for c in record.sampled]
            config = ConfigRecord({"server-round": server_round})
            messages = list(strategy.configure_train(server_round, arrays, config, SubsetGrid(grid, nodes)))
            # In client order (Flower's sampling shuffles them): the order the in-process engine runs them in.
            position = {node: i for i, node in enumerate(nodes)}
            messages.sort(key=lambda m: position.get(m.metadata.dst_node_id, len(position)))
            take = _Take(record, directory, arrays, accumulate(server_round, arrays) if accumulate else None)
            replies = exchange(grid, messages, settings.round_timeout, on_reply=take)
            answered = {directory.by_node.get(r.metadata.src_node_id) for r in replies}
            record.missing = [c for c in record.sampled if c not in answered]
            good = take.good()
            for reply in good:
                record.train.append({"client_id": client_id_of(reply) or "?", "metrics": _metrics_of(reply)})
            record.upload_bytes = int(sum(e["metrics"].get("upload-bytes", 0) for e in record.train))
            record.dense_bytes = int(sum(e["metrics"].get("dense-bytes", 0) for e in record.train))
            if len(good) >= settings.min_clients:
                new_arrays = (take.accumulator.result() if take.accumulator is not None
                              else aggregate(server_round, good, arrays))
                if new_arrays is not None:
                    arrays = new_arrays
            else:
                log.warning("round %d: %d usable updates, fewer than min-clients %d; the model is unchanged",
                            server_round, len(good), settings.min_clients)
        train_done = time.perf_counter()
        evaluators = sample_clients(clients, settings.fraction_evaluate, settings.seed, server_round, "evaluate",
                                    cap=settings.max_evaluate_clients)
        messages = []
        if evaluators:
            subset = SubsetGrid(grid, [directory.node_of(c) for c in evaluators])
            messages = list(strategy.configure_evaluate(server_round, arrays, ConfigRecord(), subset))
        replies = exchange(grid, messages, settings.round_timeout,
                           while_out=partial(_evaluate_on_server, record, evaluate_fn, server_round, arrays))
        replies = _split_replies(replies, directory, arrays, record, check_arrays=False)
        record.evaluate = [{"client_id": client_id_of(r) or "?", "metrics": _metrics_of(r)} for r in replies]
        finished = time.perf_counter()
        record.seconds = finished - started
        # "evaluate" is the whole phase, push to last reply, the server's own evaluation ("server") included.
        record.phase_seconds = {"train": round(train_done - started, 4),
                                "evaluate": round(finished - train_done, 4),
                                "server": record.phase_seconds.get("server", 0.0)}
        on_round(record, arrays)
    return arrays
