"""How long a deployed client waits, and for what: its SuperNode's pulls, its executor's asks for a task, and
a message's objects that have not arrived yet. Fast while a run keeps the client busy, slow when idle.

Objects still on their way.

Flower 1.41 (pinned) stores a message that a SuperNode pulls before the message's objects (its arrays and
configs) have arrived, so the forked task that runs the ClientApp can ask for an object still on its way.
Flower's pull then waits PULL_INITIAL_BACKOFF = 1 s before it asks again (doubling up to 10 s). On loopback
the object is there milliseconds later: traced per call, about half the tasks of a deployed digits round
sat out a whole second this way (`benchmarks/RESULTS.md`, "Deployment rounds"). The same retries, starting at
10 ms and capped at 1 s (30 ms for a task's pulls from its own SuperNode, which answers on loopback at once);
a pull still gives up only after Flower's PULL_MAX_TIME.

Polls. Flower's SuperNode pulls every 3 s; fedpriv's caps that at `--poll-interval` (0.2 s). Measured idle,
one client cost 9% of a core (and the SuperLink 3.4% more): ten clients on one machine burned most of a core
waiting. So the SuperNode slows down once idle.

Wake-ups. The executor asked its SuperNode for a task every 50 ms while busy: 20 requests a second through the
SuperNode's HTTP stack, which on a 2-core host took 5-8% of a core per client from the training and the
server's test pass running beside them (benchmarks/RESULTS.md, "A wake-up instead of the executor's polls").
The SuperNode now says when it has stored a message: one UDP datagram on loopback to its executor, which asks
for the task at once and otherwise only every WAKE_FALLBACK s (what a lost datagram costs).

Held pulls. A SuperNode's pull that finds no message used to come back at once, and the SuperNode asked again
`--poll-interval` (0.2 s) later: a message waited 0.1 s on average before its node heard of it, twice a round,
and every node sent 5 TLS requests a second, each signed by the node and checked by the SuperLink. fedpriv's
SuperLink now holds an empty pull up to PULL_HOLD s and answers as soon as a message for that node is stored
(long polling: Flower's own handler asked again, inside the SuperLink's process, each time its link state
stores a message, and at least every HOLD_RECHECK s). At most MAX_HELD_PULLS are held at once, so the
SuperLink's worker threads (40, shared by its Fleet, runtime and Control APIs) keep room for pushes, objects
and heartbeats; a pull beyond that is answered at once, as before. Flower's SuperNode times a pull out after
30 s. The ServerApp's pulls for its messages' replies (the runtime API) are held alike, and its round loop
(server/rounds.py) then pulls again at once instead of sleeping its own 0.2 s poll.

This module imports no torch (nor anything of fedpriv's): the SuperNode process imports it too.
"""

from __future__ import annotations

import contextlib
import select
import socket
import threading
import time
from functools import partial

FIRST_WAIT = 0.01  # seconds before the first retry (Flower: 1 s)
LONGEST_WAIT = 1.0  # cap of the doubling waits (Flower: 10 s)
LOCAL_WAIT = 0.03  # the same cap for a task's pulls from its own SuperNode on loopback


def quick_retries(pull, cap: float = LONGEST_WAIT):  # noqa: ANN001, ANN201 - Flower's pull_objects or pull_and_inflate_object_from_tree
    """`pull` with short waits; unbounded tries, so PULL_MAX_TIME alone decides when it gives up, as before."""
    if getattr(pull, "quick_retries", False):
        return pull
    quick = partial(pull, initial_backoff=FIRST_WAIT, backoff_cap=cap, max_tries_per_object=None)
    quick.quick_retries = True  # type: ignore[attr-defined]
    return quick


def shorten_object_waits() -> None:
    """In this process: the ClientApp task's pulls from its SuperNode, and the SuperNode's from the SuperLink."""
    import flwr.supernode.runtime.run_clientapp as task
    import flwr.supernode.start_client_internal as node

    task.pull_and_inflate_object_from_tree = quick_retries(task.pull_and_inflate_object_from_tree, LOCAL_WAIT)
    node.pull_objects = quick_retries(node.pull_objects)


# The executor's asks for a task: 50 ms while a run keeps this client busy (a round's next message comes
# seconds after the last), 0.25 s once nothing came for IDLE_AFTER s.
BUSY_POLL, IDLE_POLL, IDLE_AFTER = 0.05, 0.25, 10.0
# The SuperNode's pulls from the SuperLink once idle (busy: the --poll-interval cap).
SUPERNODE_IDLE_POLL = 1.0
# Flower's SuperNode also sleeps 0.5 s between looks at its own memory (has the ClientApp replied? are the
# reply's objects stored?): no request leaves the process, so these look every 20 ms (about 50 us of CPU each).
SUPERNODE_LOCAL_POLL = 0.02
FLOWER_EMPTY_PULL_SLEEP = 3.0  # Flower 1.41's sleep after a pull that brought no message


def executor_wait(idle_seconds: float) -> float:
    """Seconds to wait before asking for a task again, `idle_seconds` after the last task (or start)."""
    return BUSY_POLL if idle_seconds < IDLE_AFTER else IDLE_POLL


def supernode_wait(asked: float, cap: float, empty_pulls: int) -> float:
    """What the SuperNode sleeps when Flower asks for `asked` s. After an empty pull: at most `cap` while busy;
    after IDLE_AFTER s of empty pulls in a row, at most max(cap, SUPERNODE_IDLE_POLL). A local wait (shorter
    than Flower's empty-pull sleep): at most SUPERNODE_LOCAL_POLL."""
    if asked < FLOWER_EMPTY_PULL_SLEEP:
        return min(asked, SUPERNODE_LOCAL_POLL)
    idle = empty_pulls * cap >= IDLE_AFTER
    return min(asked, max(cap, SUPERNODE_IDLE_POLL) if idle else cap)


WAKE_FALLBACK = 1.0  # seconds between the executor's asks when no wake-up comes (a lost datagram, an idle client)
WAKE = b"message"


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wake_executor(port: int) -> None:
    """In the SuperNode: tell the executor on this host that a message is stored. Never raises: a datagram
    lost or unheard costs the executor's fallback wait, not the message."""
    with contextlib.suppress(OSError), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.sendto(WAKE, ("127.0.0.1", port))


def wake_on_message(port: int) -> None:
    """In the SuperNode (Flower 1.41, pinned): after each pull that stored a message (its objects included),
    wake the executor. `_pull_and_store_message` is a module global its loop calls by name; should a later
    Flower rename it, this raises rather than leave the executor waiting a second per message."""
    import flwr.supernode.start_client_internal as node

    pull = node._pull_and_store_message  # noqa: SLF001 - the one hook there is
    if getattr(pull, "wakes", None) == port:
        return

    def pull_and_wake(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202 - Flower's signature, passed through
        run_id = pull(*args, **kwargs)
        if run_id is not None:
            wake_executor(port)
        return run_id

    pull_and_wake.wakes = port  # type: ignore[attr-defined]
    node._pull_and_store_message = pull_and_wake  # noqa: SLF001


class WakeListener:
    """The executor's end: a UDP socket on loopback that the SuperNode's wake-ups reach."""

    def __init__(self, port: int) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            self.sock.bind(("127.0.0.1", port))
        except OSError:
            self.sock.close()
            raise
        self.sock.setblocking(False)

    def wait(self, seconds: float) -> bool:
        """Block until a wake-up or `seconds`; True if woken. Every datagram already queued is taken, so one
        message wakes the executor once however many times it was announced."""
        ready, _, _ = select.select([self.sock], [], [], seconds)
        woken = bool(ready)
        with contextlib.suppress(BlockingIOError):
            while self.sock.recv(64):
                woken = True
        return woken

    def close(self) -> None:
        self.sock.close()


PULL_HOLD = 1.0  # seconds an empty pull is held at the SuperLink
MAX_HELD_PULLS = 16
HOLD_RECHECK = 0.25  # a held pull asks again this often even without a store (a store path not signalled)


class Stores:
    """Counts the messages stored in the SuperLink's state; a held pull sleeps until the count moves."""

    def __init__(self) -> None:
        self._count = 0
        self._moved = threading.Condition()

    def count(self) -> int:
        return self._count

    def stored(self) -> None:
        with self._moved:
            self._count += 1
            self._moved.notify_all()

    def wait_past(self, seen: int, timeout: float) -> None:
        with self._moved:
            self._moved.wait_for(lambda: self._count != seen, timeout=max(0.0, timeout))


def _held(pull, hold: float, slots: threading.BoundedSemaphore, recheck: float, empty, wanted, stores: Stores):  # noqa: ANN001, ANN202 - Flower's handlers, passed through
    """`pull` that asks again whenever a message is stored (or every `recheck` s), up to `hold` s, while its
    response is `empty` (and the request `wanted` anything): only as many calls wait at once as `slots`
    allows, the rest answer at once, as before."""

    def held_pull(request, *args, **kwargs):  # noqa: ANN001, ANN202
        seen = stores.count()  # before the pull: a store while it runs is not missed
        response = pull(request, *args, **kwargs)
        if not (empty(response) and wanted(request)) or not slots.acquire(blocking=False):
            return response
        try:
            deadline = time.monotonic() + hold
            while empty(response) and time.monotonic() < deadline:
                stores.wait_past(seen, min(recheck, deadline - time.monotonic()))
                seen = stores.count()
                response = pull(request, *args, **kwargs)
            return response
        finally:
            slots.release()

    held_pull.holds = True  # type: ignore[attr-defined]
    return held_pull


def _signalling(store, stores: Stores):  # noqa: ANN001, ANN202 - a LinkState's store_message_ins/res
    def signalled(self, message):  # noqa: ANN001, ANN202
        try:
            return store(self, message)
        finally:
            stores.stored()

    return signalled


def hold_empty_pulls(hold: float = PULL_HOLD, max_held: int = MAX_HELD_PULLS, recheck: float = HOLD_RECHECK) -> None:
    """In the SuperLink (Flower 1.41, pinned): the Fleet API's pull-messages handler (a SuperNode asking for
    its next message) and the runtime API's (the ServerApp asking for replies), each held while empty and
    asked again when the link state stores a message. Both routers call the handlers' module by attribute, so
    patching the module's function reaches them; should a later Flower move them, this raises rather than
    leave the deployment on short polls unknowingly."""
    import flwr.server.superlink.linkstate.in_memory_linkstate as in_memory
    import flwr.server.superlink.linkstate.sql_linkstate as sql
    import flwr.superlink.servicer.fleet.fleet_handlers as fleet
    import flwr.superlink.servicer.runtime.runtime_handlers as runtime

    if getattr(fleet.pull_messages, "holds", False):
        return
    stores = Stores()
    for state in (in_memory.InMemoryLinkState, sql.SqlLinkState):
        for name in ("store_message_ins", "store_message_res"):
            setattr(state, name, _signalling(getattr(state, name), stores))

    def no_messages(response) -> bool:  # noqa: ANN001
        return not response.messages_list

    # One cap for both APIs: the SuperLink serves them (and the Control API) from one FastAPI app, whose
    # synchronous handlers share one pool of 40 threads.
    slots = threading.BoundedSemaphore(max_held)
    fleet.pull_messages = _held(fleet.pull_messages, hold, slots, recheck, no_messages, lambda _: True, stores)
    # Only a pull that names replies it waits for: an agent app's pull for instructions names none.
    runtime.pull_messages = _held(runtime.pull_messages, hold, slots, recheck, no_messages,
                                  lambda request: len(request.message_ids) > 0, stores)
