"""Deployed messages carry each ArrayRecord as one Array (common/arrays.py pack_arrays, server/rounds.py
PackedGrid, client/app.py packed_transport): what the apps see is exactly what was sent, a shared record is
packed once, and a packed message whose layout does not add up is refused, never read shifted."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.supercore.task_identity import TaskIdentity

from client.app import packed_transport
from common.arrays import PACKED, array_record, as_numpy, pack_arrays, unpack_arrays
from server.rounds import PackedGrid
from simulations.inprocess import InProcessGrid


def weights() -> ArrayRecord:
    rng = np.random.default_rng(0)
    return array_record({"conv.weight": rng.standard_normal((4, 1, 3, 3)).astype(np.float32),
                         "conv.bias": np.arange(4, dtype=np.float64),
                         "steps": np.array(7, dtype=np.int64),  # 0-d
                         "empty": np.zeros((0, 5), dtype=np.float32)})


def content() -> RecordDict:
    return RecordDict({"arrays": weights(), "config": ConfigRecord({"lr": 0.1}),
                       "metrics": MetricRecord({"n": 3})})


def test_pack_then_unpack_gives_back_every_array_byte_for_byte() -> None:
    original, packed = content(), content()
    pack_arrays(packed)
    assert list(packed.array_records["arrays"]) == ["packed"]  # one object instead of four
    assert json.loads(str(packed.config_records[PACKED]["arrays"]))[0][0] == "conv.weight"
    assert unpack_arrays(packed) is True
    assert PACKED not in packed.config_records
    got, want = packed.array_records["arrays"], original.array_records["arrays"]
    assert list(got) == list(want)
    for key in want:
        assert (got[key].dtype, got[key].shape, got[key].stype) == (want[key].dtype, want[key].shape, want[key].stype)
        assert got[key].data == want[key].data
        np.testing.assert_array_equal(as_numpy(got[key]), as_numpy(want[key]))
    assert packed.config_records["config"]["lr"] == 0.1 and packed.metric_records["metrics"]["n"] == 3
    assert unpack_arrays(content()) is False  # not packed: left alone


def test_a_record_shared_by_many_messages_is_packed_once() -> None:
    shared = weights()
    first, second = RecordDict({"arrays": shared}), RecordDict({"arrays": shared})
    memo: dict = {}
    pack_arrays(first, memo)
    pack_arrays(second, memo)
    assert first.array_records["arrays"] is second.array_records["arrays"]


@pytest.mark.parametrize("change", ["short", "long"])
def test_a_layout_that_does_not_add_up_is_refused(change: str) -> None:
    packed = content()
    pack_arrays(packed)
    layout = json.loads(str(packed.config_records[PACKED]["arrays"]))
    layout[0][4] += -8 if change == "short" else 8
    packed.config_records[PACKED]["arrays"] = json.dumps(layout)
    with pytest.raises(ValueError, match="packed record 'arrays'.*corrupt"):
        unpack_arrays(packed)


def grid_of(app: ClientApp) -> PackedGrid:
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
    return PackedGrid(InProcessGrid(app, [{"cid": "a"}], {}, run_id=1))


def send(grid: PackedGrid) -> Message:
    node = grid.get_node_ids()[0]
    message = Message(RecordDict({"arrays": weights()}), dst_node_id=node, message_type="train")
    [reply] = grid.send_and_receive([message], timeout=10)
    return reply


def test_the_client_app_sees_and_returns_plain_records_through_a_packed_grid() -> None:
    app, seen = ClientApp(mods=[packed_transport]), {}

    @app.train()
    def double(msg: Message, context: Context) -> Message:
        seen["keys"] = list(msg.content.array_records["arrays"])
        state = {k: as_numpy(a) * 2 for k, a in msg.content.array_records["arrays"].items()}
        return Message(RecordDict({"arrays": array_record(state)}), reply_to=msg)

    reply = send(grid_of(app))
    assert seen["keys"] == ["conv.weight", "conv.bias", "steps", "empty"]
    assert PACKED not in reply.content.config_records
    got = reply.content.array_records["arrays"]
    np.testing.assert_array_equal(as_numpy(got["conv.bias"]), np.arange(4) * 2.0)
    assert as_numpy(got["steps"]).shape == () and int(as_numpy(got["steps"])) == 14


def test_a_reply_that_does_not_unpack_loses_its_arrays_with_a_warning(caplog) -> None:  # noqa: ANN001
    def forge(msg: Message, context: Context, call_next) -> Message:  # noqa: ANN001
        reply = call_next(msg, context)
        layouts = reply.content.config_records[PACKED]
        layout = json.loads(str(layouts["arrays"]))
        layout[0][4] -= 4
        layouts["arrays"] = json.dumps(layout)
        return reply

    app = ClientApp(mods=[forge, packed_transport])

    @app.train()
    def echo(msg: Message, context: Context) -> Message:
        return Message(RecordDict({"arrays": msg.content.array_records["arrays"]}), reply_to=msg)

    with caplog.at_level(logging.WARNING):
        reply = send(grid_of(app))
    assert not reply.content.array_records  # the update checks then drop it as a reply without an update
    assert "does not unpack" in caplog.text and "corrupt" in caplog.text
