"""What a deployed round no longer pays: Flower's 1 s first wait for an object still on its way (common/deploy_waits.py,
server/rounds.py), torch's compiler imports in every forked task, torch in the client's supervising process, and the
executor's 50 ms asks for a task (a wake-up from the SuperNode instead)."""

from __future__ import annotations

import time
from functools import partial

import pytest
from flwr.supercore.inflatable.inflatable_utils import ObjectUnavailableError, pull_objects

from common.deploy_waits import quick_retries, shorten_object_waits
from server.rounds import shorten_reply_object_waits


def late_object(delay: float):  # noqa: ANN201
    ready_at = time.monotonic() + delay

    def pull(object_id: str) -> bytes:
        if time.monotonic() < ready_at:
            raise ObjectUnavailableError(object_id)
        return b"content of " + object_id.encode()

    return pull


def timed(pull) -> float:  # noqa: ANN001
    started = time.monotonic()
    assert pull(["a", "b"], pull_object_fn=late_object(0.05)) == {"a": b"content of a", "b": b"content of b"}
    return time.monotonic() - started


def test_a_late_object_costs_its_delay_not_a_second() -> None:
    assert timed(quick_retries(pull_objects)) < 0.4
    assert timed(pull_objects) > 0.7  # Flower's own first retry: what the patch removes


def test_the_patches_replace_flowers_module_globals_once() -> None:
    import flwr.superlink.grid.http_grid as http_grid
    import flwr.supernode.runtime.run_clientapp as task
    import flwr.supernode.start_client_internal as node

    saved = (task.pull_and_inflate_object_from_tree, node.pull_objects, http_grid.pull_objects)
    try:
        shorten_object_waits()
        shorten_object_waits()
        shorten_reply_object_waits()
        for patched in (task.pull_and_inflate_object_from_tree, node.pull_objects, http_grid.pull_objects):
            assert patched.quick_retries and patched.keywords["initial_backoff"] == 0.01
            assert not hasattr(patched.func, "keywords")  # not wrapped twice
    finally:
        task.pull_and_inflate_object_from_tree, node.pull_objects, http_grid.pull_objects = saved


def test_a_warmed_executor_imports_nothing_at_a_tasks_first_step() -> None:
    """What a forked task would otherwise import when it builds its first optimizer (torch._dynamo, about half
    a second) is already in the executor: a fresh interpreter, warmed, then one real training step."""
    import subprocess
    import sys

    code = """
import sys
import client.app, client.deploy
from common.datasets import load_dataset
ds = load_dataset("digits")
client.deploy.warm_optimizer()
from common.config import TrainConfig
from client.reuse import reusable_model, reusable_optimizer
from common.training import train
cfg = TrainConfig.from_run_config({"model": "mlp", "local-epochs": 1, "batch-size": 64, "learning-rate": 0.05})
before = set(sys.modules)
model = reusable_model("mlp", ds.spec)
train(model, ds.x_train[:64], ds.y_train[:64], cfg, seed=0, optimizer=reusable_optimizer(model, cfg))
print(sorted(set(sys.modules) - before))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]", out.stdout[:400]


def test_the_client_supervisor_does_not_import_torch_for_a_cpu_client(tmp_path) -> None:  # noqa: ANN001
    """`fedpriv client` supervises a SuperNode and the executor; torch there would cost every client ~300 MB."""
    import subprocess
    import sys

    code = f"""
import sys
from pathlib import Path
from client.deploy import ClientSettings
ClientSettings(superlink="127.0.0.1:9092", data=Path("x.npz"), state_dir=Path({str(tmp_path)!r}),
               client_id="c", root_cert=None, key=None, insecure=True, budget_epsilon=None, budget_delta=None,
               dataset=None, port=None, device="cpu")
print("torch" in sys.modules)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-400:]
    assert out.stdout.strip() == "False"


def test_an_idle_executor_asks_less_often() -> None:
    from common.deploy_waits import BUSY_POLL, IDLE_AFTER, IDLE_POLL, executor_wait

    assert executor_wait(0.0) == executor_wait(IDLE_AFTER - 0.01) == BUSY_POLL == 0.05
    assert executor_wait(IDLE_AFTER) == executor_wait(3600) == IDLE_POLL == 0.25


def test_an_idle_supernode_pulls_less_often() -> None:
    from common.deploy_waits import SUPERNODE_IDLE_POLL, supernode_wait

    assert supernode_wait(3, 0.2, 1) == 0.2  # an empty pull while busy: the --poll-interval cap
    assert supernode_wait(0.5, 0.2, 0) == 0.02  # waiting for the ClientApp's reply: a look at its own memory
    assert supernode_wait(0.5, 3.0, 60) == 0.02
    assert supernode_wait(3, 0.2, 49) == 0.2 and supernode_wait(3, 0.2, 50) == SUPERNODE_IDLE_POLL == 1.0
    assert supernode_wait(3, 3.0, 10) == 3.0  # Flower's own interval stays what it was


def test_only_a_deployments_grid_is_packed() -> None:
    """server/rounds.deployed: Flower's HttpGrid is a deployment; an in-process grid is not, and asking does not
    import the HTTP grid (FastAPI and more) into a simulation."""
    import subprocess
    import sys

    from flwr.superlink.grid.http_grid import HttpGrid

    from server.rounds import PackedGrid, deployed, packed_if_deployed
    from simulations.inprocess import InProcessGrid

    http = HttpGrid("127.0.0.1:9091", insecure=True, token="t")
    assert deployed(http) and isinstance(packed_if_deployed(http), PackedGrid)
    local = InProcessGrid(None, [], {}, run_id=1)
    assert not deployed(local) and packed_if_deployed(local) is local
    probe = ("import sys\nfrom server.rounds import deployed\nfrom simulations.inprocess import InProcessGrid\n"
             "assert not deployed(InProcessGrid(None, [], {}, run_id=1))\n"
             "print('flwr.superlink.grid.http_grid' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "False", done.stderr[-2000:]


def test_a_stored_message_wakes_the_executor_and_an_empty_pull_does_not() -> None:
    import flwr.supernode.start_client_internal as node

    from common.deploy_waits import WakeListener, free_udp_port, wake_on_message

    results = iter([None, 7])
    saved = node._pull_and_store_message
    node._pull_and_store_message = lambda **kwargs: next(results)
    port = free_udp_port()
    listener = WakeListener(port)
    try:
        wake_on_message(port)
        wake_on_message(port)  # a restarted SuperNode's wrapper: not wrapped twice
        assert node._pull_and_store_message.wakes == port
        assert node._pull_and_store_message(state=None) is None  # an empty pull: no wake-up
        assert not listener.wait(0.1)
        started = time.monotonic()
        assert node._pull_and_store_message(state=None) == 7
        assert listener.wait(5.0) and time.monotonic() - started < 1.0
        assert not listener.wait(0.05)  # taken once
    finally:
        node._pull_and_store_message = saved
        listener.close()


def test_wake_ups_only_where_both_ends_are_fedpriv_s(tmp_path) -> None:  # noqa: ANN001
    """The fork executor with fedpriv's SuperNode hears of each message; Flower's own 3 s SuperNode (no wrapper
    to send) and Flower's executor (nobody listening) leave the executor to its 50 ms polls."""
    from dataclasses import replace
    from pathlib import Path

    from client.deploy import FLOWER_POLL, ClientSettings, supernode_command, wake_port_for
    from common.deploy_waits import WakeListener

    settings = ClientSettings(superlink="127.0.0.1:9092", data=Path("x.npz"), state_dir=tmp_path, client_id="c",
                              root_cert=None, key=None, insecure=True, budget_epsilon=None, budget_delta=None,
                              dataset=None, port=None, device="cpu")
    port = wake_port_for(settings)
    assert port and supernode_command(settings, 9100, tmp_path / "n.toml", port)[3:5] == ["0.2", str(port)]
    assert wake_port_for(replace(settings, poll_interval=FLOWER_POLL)) is None
    assert wake_port_for(replace(settings, executor="flower")) is None
    assert supernode_command(settings, 9100, tmp_path / "n.toml")[4] == "0"
    taken = WakeListener(port)
    try:
        with pytest.raises(OSError):
            WakeListener(port)  # the executor then says "wake-ups off" and polls
    finally:
        taken.close()


@pytest.mark.parametrize("api", ["fleet", "runtime"])
def test_the_superlink_holds_an_empty_pull_until_a_message_is_stored(api: str) -> None:
    """Long polling at the SuperLink, for a SuperNode's pulls (Fleet API) and the ServerApp's pulls for replies
    (runtime API): a pull is answered as soon as a message is there, an empty one after the hold, and past
    `max_held` concurrent holds at once (the worker threads stay free)."""
    import threading
    from types import SimpleNamespace

    import flwr.superlink.servicer.fleet.fleet_handlers as fleet
    import flwr.superlink.servicer.runtime.runtime_handlers as runtime
    from flwr.server.superlink.linkstate.in_memory_linkstate import InMemoryLinkState
    from flwr.server.superlink.linkstate.sql_linkstate import SqlLinkState

    from common.deploy_waits import hold_empty_pulls

    stored_at = [float("inf")]  # when the "message" arrives in the link state
    calls = [0]

    def fake_pull(request, state, store):  # noqa: ANN001, ANN202
        calls[0] += 1
        return SimpleNamespace(messages_list=["message"] if time.monotonic() >= stored_at[0] else [])

    def fake_store(self, message):  # noqa: ANN001, ANN202 - the link state storing a message
        stored_at[0] = time.monotonic()

    handlers = fleet if api == "fleet" else runtime
    request = SimpleNamespace(message_ids=["m1"])  # the replies a ServerApp waits for; a SuperNode names none
    saved = fleet.pull_messages, runtime.pull_messages
    saved_stores = {(state, name): getattr(state, name) for state in (InMemoryLinkState, SqlLinkState)
                    for name in ("store_message_ins", "store_message_res")}
    fleet.pull_messages = runtime.pull_messages = fake_pull
    InMemoryLinkState.store_message_ins = InMemoryLinkState.store_message_res = fake_store
    try:
        hold_empty_pulls(hold=0.5, max_held=1, recheck=0.01)
        hold_empty_pulls(hold=9.0)  # not wrapped twice
        pull = partial(handlers.pull_messages, request=request, state=None, store=None)
        assert handlers.pull_messages.holds

        started = time.monotonic()
        assert pull().messages_list == []
        assert 0.45 < time.monotonic() - started < 1.5  # held for the hold, then empty

        stored_at[0] = time.monotonic() + 0.15
        started = time.monotonic()
        assert pull().messages_list == ["message"]
        assert 0.1 < time.monotonic() - started < 0.4  # answered once stored, not after the hold

        stored_at[0] = float("inf")
        holder = threading.Thread(target=pull)
        holder.start()
        time.sleep(0.1)
        started, before = time.monotonic(), calls[0]
        assert pull().messages_list == []
        assert time.monotonic() - started < 0.1  # the one slot is taken: answered at once, as Flower does
        holder.join()
        assert calls[0] > before + 5  # the held pull asked the state again meanwhile

        # A store wakes a held pull at once, long before its next recheck (10 s here).
        fleet.pull_messages = runtime.pull_messages = fake_pull
        stored_at[0] = float("inf")
        hold_empty_pulls(hold=20.0, max_held=1, recheck=10.0)
        store = "store_message_ins" if api == "fleet" else "store_message_res"
        threading.Timer(0.2, getattr(InMemoryLinkState, store), args=(None, "message")).start()
        started = time.monotonic()
        assert partial(handlers.pull_messages, request=request, state=None, store=None)().messages_list == ["message"]
        assert 0.15 < time.monotonic() - started < 1.0

        if api == "runtime":  # an agent app's pull for instructions names no replies: answered at once
            stored_at[0] = float("inf")
            started = time.monotonic()
            assert handlers.pull_messages(SimpleNamespace(message_ids=[]), None, None).messages_list == []
            assert time.monotonic() - started < 0.1
    finally:
        fleet.pull_messages, runtime.pull_messages = saved
        for (state, name), method in saved_stores.items():
            setattr(state, name, method)


class _HeldGrid:
    """A SuperLink that holds pulls: each pull waits `hold` s and brings the next reply in push order."""

    def __init__(self, hold: float) -> None:
        self.hold, self.pulls, self.pending = hold, 0, []

    def push_messages(self, messages):  # noqa: ANN001, ANN201
        self.pending = [f"m{i}" for i, _ in enumerate(messages)]
        return list(self.pending)

    def pull_messages(self, message_ids):  # noqa: ANN001, ANN201
        from types import SimpleNamespace

        self.pulls += 1
        time.sleep(self.hold)
        return [SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=message_ids[0]))]


def test_the_server_pulls_again_at_once_after_a_held_or_fruitful_pull() -> None:
    """The round loop sleeps its poll only after an empty pull that came back at once: replies trickling in
    one a pull through a holding SuperLink cost the holds, not a poll each."""
    from server.rounds import exchange

    grid = _HeldGrid(hold=0.05)
    started = time.monotonic()
    replies = exchange(grid, [1, 2, 3, 4], timeout=10.0, poll_seconds=1.0)
    assert [r.metadata.reply_to_message_id for r in replies] == ["m0", "m1", "m2", "m3"] and grid.pulls == 4
    assert time.monotonic() - started < 0.9  # four holds (0.2 s), no 1 s poll between them
