"""The in-process engine: a Flower Grid that hands each message straight to the ClientApp.

The same ServerApp and ClientApp run as on Flower's Ray runtime or in a deployment; what is left out is the
transport (serialization, queues, actors), which on a small CPU machine costs more than the training.
Each simulated node keeps one persistent Context, as a SuperNode does, so `context.state` survives rounds.
"""

from __future__ import annotations

import secrets
import traceback
import uuid
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.supercore.run import Run

# Flower's Message() reads the sender's identity from this process-wide object, which a runtime sets when it
# starts a task. It is internal to Flower 1.41 and may move in a later release (pinned in constraints.txt).
from flwr.supercore.task_identity import TaskIdentity

SERVER_NODE_ID = 1  # what Flower's SuperLink uses as the server's node id
CLIENT_APP_RAISED_EXCEPTION = 2  # flwr.common.constant.ErrorCode: the code a SuperNode uses for the same case


class InProcessGrid(Grid):
    def __init__(self, client_app: ClientApp, node_configs: list[Mapping[str, Any]],
                 run_config: Mapping[str, Any], run_id: int) -> None:
        self._client_app = client_app
        self._run = Run.create_empty(run_id=run_id)
        # One run config shared by every node (the ClientApp only reads it): at 10,000 clients a copy each
        # was tens of MB. Node ids start at 2, after the server's.
        shared = dict(run_config)
        self._contexts = {
            SERVER_NODE_ID + 1 + i: Context(run_id=run_id, node_id=SERVER_NODE_ID + 1 + i, node_config=dict(nc),
                                            state=RecordDict(), run_config=shared)
            for i, nc in enumerate(node_configs)
        }
        self._pending: dict[str, Message] = {}

    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        return Message(content, dst_node_id=dst_node_id, message_type=message_type, group_id=group_id, ttl=ttl)

    def get_node_ids(self) -> list[int]:
        return list(self._contexts)

    def context_of(self, node_id: int) -> Context:
        return self._contexts[node_id]

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = uuid.uuid4().hex
            self._pending[msg.metadata.message_id] = msg
            ids.append(msg.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterator[Message]:
        """Runs each message as its reply is taken, in the order asked: the round loop checks and folds in a
        reply while its arrays are still in cache (server/aggregation.py)."""
        for mid in list(message_ids):
            if mid in self._pending:
                yield self._deliver(self._pending.pop(mid))

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        return list(self.pull_messages(self.push_messages(messages)))

    def _deliver(self, msg: Message) -> Message:
        context = self._contexts[msg.metadata.dst_node_id]
        try:
            reply = self._client_app(msg, context)
        except Exception as exc:  # a client's failure is its reply, as on a SuperNode; the run goes on
            reason = f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=3)}"
            reply = Message(Error(code=CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=msg)
        reply.metadata.__dict__["_message_id"] = uuid.uuid4().hex
        return reply


def run_inprocess(server_app: ServerApp, client_app: ClientApp, node_configs: list[Mapping[str, Any]],
                  run_config: Mapping[str, Any]) -> InProcessGrid:
    """Run the ServerApp to completion over in-process clients; returns the grid (its contexts hold client state)."""
    # A fresh run id per run, as a SuperLink gives: a client's privacy ledger tells runs apart by it.
    run_id = secrets.randbits(63)
    TaskIdentity.run_id = run_id
    TaskIdentity.node_id = SERVER_NODE_ID
    TaskIdentity.task_id = 1
    grid = InProcessGrid(client_app, node_configs, run_config, run_id)
    context = Context(run_id=run_id, node_id=SERVER_NODE_ID, node_config={}, state=RecordDict(),
                      run_config=dict(run_config))
    server_app(grid, context)
    return grid
