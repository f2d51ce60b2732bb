"""Aggregations that take a round's good updates one at a time, in client order.

The in-process engine delivers replies one by one. Folding each update into a running sum as it arrives
reads its arrays while they are still in cache and frees them at once (the next client's reply then reuses
the same memory), instead of holding every sampled client's full model until the round ends and reading them
all again from memory: 10-20 ms of a 0.17 s round at 50 clients of 235k weights. Replies that arrive
together (a deployment, Ray) or runs that need every reply (an audit) are folded by the same code in the same
client order, so every engine gives the same bits.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Protocol

import numpy as np
from flwr.app import ArrayRecord, Message, MetricRecord

from common.arrays import array_record, as_numpy
from common.messages import get_record


class Accumulator(Protocol):
    def add(self, reply: Message) -> None:
        """Fold in one checked reply (its `arrays` and `metrics`)."""

    def result(self) -> ArrayRecord | None:
        """The aggregate of everything added; None when nothing was."""


class WeightedMean:
    """FedAvg: sum_k n_k w_k / sum_k n_k, with n_k a reply's `weight_key` metric (checked positive before)."""

    def __init__(self, weight_key: str = "num-examples") -> None:
        self.weight_key = weight_key
        self._sum: dict[str, np.ndarray] = {}
        self._scratch: dict[str, np.ndarray] = {}
        self._total = 0.0

    def add(self, reply: Message) -> None:
        weight = float(get_record(reply.content, "metrics", MetricRecord)[self.weight_key])
        arrays = get_record(reply.content, "arrays", ArrayRecord)
        for key, array in arrays.items():
            values = as_numpy(array)
            if key not in self._sum:
                self._sum[key] = values * weight
                self._scratch[key] = np.empty_like(self._sum[key])
            else:  # the product into scratch memory that stays in cache, then the sum in place
                np.multiply(values, weight, out=self._scratch[key])
                self._sum[key] += self._scratch[key]
        self._total += weight

    def result(self) -> ArrayRecord | None:
        if not self._sum:
            return None
        return array_record({key: total / self._total for key, total in self._sum.items()})


def folded(accumulator: Accumulator, replies: Iterable[Message]) -> ArrayRecord | None:
    """All replies at once, in the order given (the round loop sorts them by client id)."""
    for reply in replies:
        accumulator.add(reply)
    return accumulator.result()


class InOrder:
    """Feeds good replies to an accumulator in the sampled clients' order, whatever order they arrive in: a
    reply waits until every client sampled before it has been accounted for (answered, or given up on at
    `finish`). After folding a reply in it drops the reply's arrays; its metrics stay for the record."""

    def __init__(self, order: list[str], accumulator: Accumulator) -> None:
        self.accumulator = accumulator
        self.good: list[Message] = []
        self._order = order
        self._position = {client: i for i, client in enumerate(order)}
        self._next = 0
        self._waiting: dict[str, Message | None] = {}

    def offer(self, client_id: str, reply: Message | None) -> str | None:
        """A client's reply (None: it answered without a usable update). Returns why it cannot be placed
        (a client not sampled this round, or one that already answered), else None."""
        position = self._position.get(client_id)
        if position is None:
            return "reply from a client that was not sampled this round"
        if position < self._next or client_id in self._waiting:
            return "a second reply from this client this round"
        self._waiting[client_id] = reply
        while self._next < len(self._order) and self._order[self._next] in self._waiting:
            self._fold(self._waiting.pop(self._order[self._next]))
            self._next += 1
        return None

    def finish(self) -> None:
        """The round's replies are all in (or timed out): fold the waiting ones, in order."""
        for client_id in self._order[self._next:]:
            if client_id in self._waiting:
                self._fold(self._waiting.pop(client_id))
        self._next = len(self._order)

    def _fold(self, reply: Message | None) -> None:
        if reply is None:
            return
        self.accumulator.add(reply)
        del reply.content["arrays"]
        self.good.append(reply)


AccumulatorFactory = Callable[[int, ArrayRecord], Accumulator]
