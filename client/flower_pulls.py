"""Short first waits for a message's objects that have not arrived yet, in the SuperNode and its tasks.

Flower 1.41 (pinned) stores a message that a SuperNode pulls before the message's objects (its arrays and
configs) have arrived, so the forked task that runs the ClientApp can ask for an object still on its way.
Flower's pull then waits PULL_INITIAL_BACKOFF = 1 s before it asks again (doubling up to 10 s). On loopback
the object is there milliseconds later: traced per call, about half the tasks of a deployed digits round
sat out a whole second this way (`benchmarks/RESULTS.md`, "Deployment rounds"). The same retries, starting at
10 ms and capped at 1 s; a pull still gives up only after Flower's PULL_MAX_TIME.

Only Flower's module globals are replaced, so this imports no torch: the SuperNode process calls it too.
"""

from __future__ import annotations

from functools import partial

FIRST_WAIT = 0.01  # seconds before the first retry (Flower: 1 s)
LONGEST_WAIT = 1.0  # cap of the doubling waits (Flower: 10 s)


def quick_retries(pull):  # noqa: ANN001, ANN201 - Flower's pull_objects or pull_and_inflate_object_from_tree
    """`pull` with short waits; unbounded tries, so PULL_MAX_TIME alone decides when it gives up, as before."""
    if getattr(pull, "quick_retries", False):
        return pull
    quick = partial(pull, initial_backoff=FIRST_WAIT, backoff_cap=LONGEST_WAIT, max_tries_per_object=None)
    quick.quick_retries = True  # type: ignore[attr-defined]
    return quick


def shorten_object_waits() -> None:
    """In this process: the ClientApp task's pulls from its SuperNode, and the SuperNode's from the SuperLink."""
    import flwr.supernode.runtime.run_clientapp as task
    import flwr.supernode.start_client_internal as node

    task.pull_and_inflate_object_from_tree = quick_retries(task.pull_and_inflate_object_from_tree)
    node.pull_objects = quick_retries(node.pull_objects)
