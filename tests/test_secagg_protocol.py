"""SecAgg+ without Flower: the crypto core and the four-stage protocol, with dropouts and bad replies injected."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from client.secagg import respond
from common.secagg_crypto import (
    SecAggError,
    from_ring,
    join_shares,
    masked_input,
    neighbour_graph,
    prg,
    quantize,
    split_secret,
    to_ring,
)
from server.secagg_protocol import ProtocolSettings, run_protocol

BITS = 24
LENGTH = 64


class Federation:
    """Nodes answering with client.secagg.respond; `fail` maps a stage to the nodes that vanish at it, and
    `tamper` rewrites a node's reply at a stage (an attacker or a buggy client)."""

    def __init__(self, nodes, inputs, fail=None, tamper=None):
        self.states = {n: {} for n in nodes}
        self.inputs = inputs
        self.fail = fail or {}
        self.tamper = tamper or {}
        self.log = []

    def __call__(self, stage, requests):
        replies = {}
        for node, request in requests.items():
            self.log.append((stage, node, request))
            if node in self.fail.get(stage, ()):
                continue
            try:
                payload = respond(stage, request, self.states[node], lambda _req, n=node: self.inputs[n])
            except SecAggError as exc:
                replies[node] = {"error": str(exc)}
                continue
            reply = {**payload, "stage": stage, "round": request["round"]}
            if (stage, node) in self.tamper:
                reply = self.tamper[(stage, node)](reply)
            replies[node] = reply
        return replies


def inputs_for(nodes, seed=0):
    rng = np.random.default_rng(seed)
    return {n: to_ring(rng.integers(-1000, 1000, LENGTH), BITS) for n in nodes}


def expected_sum(inputs, nodes):
    return from_ring(sum(inputs[n] for n in nodes) & np.uint64((1 << BITS) - 1), BITS)


def run(nodes, *, shares=0, threshold=3, fail=None, tamper=None, seed=0):
    inputs = inputs_for(nodes, seed)
    fed = Federation(nodes, inputs, fail, tamper)
    out = run_protocol(1, nodes, ProtocolSettings(shares, threshold, BITS, graph_seed=seed), fed, {}, LENGTH)
    return out, inputs, fed


def test_unmasked_sum_is_exactly_the_plain_sum():
    nodes = [2, 3, 4, 5, 6]
    out, inputs, _ = run(nodes)
    assert out.stage_reached == "released" and out.survivors == nodes and not out.dropped
    assert np.array_equal(from_ring(out.total, BITS), expected_sum(inputs, nodes))


def test_sparse_graph_sum_is_exact():
    nodes = list(range(2, 12))
    graph = neighbour_graph(nodes, 5, seed=3)
    assert all(len(v) == 4 for v in graph.values())
    assert all(a in graph[b] for a in nodes for b in graph[a])  # symmetric
    out, inputs, _ = run(nodes, shares=5, threshold=3, seed=3)
    assert np.array_equal(from_ring(out.total, BITS), expected_sum(inputs, nodes))


@pytest.mark.parametrize("stage", ["setup", "share", "collect", "unmask"])
@pytest.mark.parametrize("lost", [[4], [4, 5]])  # one node; threshold-1 = 2 nodes (threshold 3 of 6)
def test_dropouts_at_each_stage_still_give_the_exact_sum(stage, lost):
    nodes = [2, 3, 4, 5, 6, 7]
    out, inputs, _ = run(nodes, threshold=3, fail={stage: lost})
    assert out.stage_reached == "released", out.refused
    # Lost before their input arrived: not in the sum. Lost at unmask: their input arrived, it is in the sum.
    in_sum = nodes if stage == "unmask" else [n for n in nodes if n not in lost]
    assert out.survivors == in_sum
    assert np.array_equal(from_ring(out.total, BITS), expected_sum(inputs, in_sum))
    assert {d["node"] for d in out.dropped} == set(lost) and {d["stage"] for d in out.dropped} == {stage}
    # Masks of nodes lost after sharing were rebuilt from their neighbours' shares, and only those.
    assert out.unmasked_from_shares == (lost if stage == "collect" else [])


def test_sparse_graph_dropout_after_sharing_is_unmasked_from_shares():
    nodes = list(range(2, 12))
    out, inputs, _ = run(nodes, shares=5, threshold=3, fail={"collect": [7]}, seed=3)
    assert out.unmasked_from_shares == [7]
    assert np.array_equal(from_ring(out.total, BITS), expected_sum(inputs, [n for n in nodes if n != 7]))


@pytest.mark.parametrize("stage", ["setup", "share", "collect"])
def test_below_threshold_nothing_is_released(stage):
    nodes = [2, 3, 4, 5]
    out, _, _ = run(nodes, threshold=3, fail={stage: [3, 4]})
    assert out.total is None and out.survivors == []
    assert "fewer than the threshold 3" in out.refused


def test_too_few_unmask_answers_release_nothing():
    nodes = [2, 3, 4, 5]
    out, _, _ = run(nodes, threshold=3, fail={"unmask": [3, 4]})
    assert out.total is None and "fewer than the threshold" in out.refused


def test_one_masked_input_looks_uniform_and_seeds_differ():
    n = 20000
    values = to_ring(np.zeros(n, dtype=np.int64), 16)  # the worst case: an all-zero update
    masked = masked_input(values, 16, b"a" * 32, {9: b"b" * 32}, me=1)
    counts = np.bincount((masked >> np.uint64(12)).astype(np.int64), minlength=16)  # top 4 bits
    assert stats.chisquare(counts).pvalue > 1e-4
    assert stats.kstest(masked.astype(np.float64) / 2**16, "uniform").pvalue > 1e-4
    # Flower's pseudo_rand_gen folds seeds to 32 bits; here every seed bit matters.
    a, b = prg(b"\x00" * 32, 1000, 32), prg(b"\x00" * 31 + b"\x01", 1000, 32)
    c = prg(b"\x01" + b"\x00" * 31, 1000, 32)
    assert not np.array_equal(a, b) and not np.array_equal(a, c) and np.mean(a == b) < 0.01
    assert np.array_equal(a, prg(b"\x00" * 32, 1000, 32))  # and the same seed gives the same mask


def test_shamir_needs_threshold_shares():
    secret = bytes(range(48))
    shares = split_secret(secret, 3, 5)
    assert join_shares(shares[1:4]) == secret and join_shares([shares[0], shares[2], shares[4]]) == secret
    try:
        fewer = join_shares(shares[:2])
    except SecAggError:  # 2 of 3: usually the padding check fails...
        fewer = None
    assert fewer != secret  # ...and never is the secret rebuilt


def test_quantize_round_trip_is_unbiased():
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, 2000)
    q = np.mean([from_ring(quantize(x, 1.0, 10.0, 16, rng), 16) / 10.0 for _ in range(200)], axis=0)
    assert np.max(np.abs(q - x)) < 0.05


def test_share_for_a_non_neighbour_drops_the_node():
    nodes = list(range(2, 12))
    graph = neighbour_graph(nodes, 5, seed=3)
    outsider = next(n for n in nodes if n not in graph[2] and n != 2)

    def misroute(reply):
        return {**reply, "dst": [outsider, *reply["dst"][1:]]}

    out, inputs, _ = run(nodes, shares=5, threshold=3, tamper={("share", 2): misroute}, seed=3)
    assert out.dropped == [{"node": 2, "stage": "share", "reason": f"share for node {outsider}, which is not "
                                                                    "its neighbour"}]
    assert np.array_equal(from_ring(out.total, BITS), expected_sum(inputs, [n for n in nodes if n != 2]))


@pytest.mark.parametrize("tamper,reason", [
    (lambda r: {**r, "masked": r["masked"][:-4]}, "masked input has 63 values, expected 64"),
    (lambda r: {**r, "masked": (np.full(LENGTH, 1 << BITS, "<u4")).tobytes()}, "outside Z_2^24"),
    (lambda r: {**r, "round": 7}, "expected 'collect' round 1"),
    (lambda r: {**r, "stage": "share"}, "reply for stage 'share'"),
])
def test_bad_masked_reply_drops_the_node_and_the_sum_stays_exact(tamper, reason):
    nodes = [2, 3, 4, 5, 6]
    out, inputs, _ = run(nodes, tamper={("collect", 3): tamper})
    assert [d["node"] for d in out.dropped] == [3] and reason in out.dropped[0]["reason"]
    assert out.unmasked_from_shares == [3]
    assert np.array_equal(from_ring(out.total, BITS), expected_sum(inputs, [2, 4, 5, 6]))


def test_client_refuses_to_reveal_both_secrets_of_a_node():
    nodes = [2, 3, 4, 5]
    fed = Federation(nodes, inputs_for(nodes))
    run_protocol(1, nodes, ProtocolSettings(0, 3, BITS, 0), fed, {}, LENGTH)
    state = fed.states[2]
    state["stage"] = "collect"  # replay the unmask stage asking for 3 as both alive and dropped
    with pytest.raises(SecAggError, match="both alive and dropped"):
        respond("unmask", {"round": 1, "alive": [2, 3], "dropped": [3]}, state)
    with pytest.raises(SecAggError, match="expected it after collect"):
        respond("unmask", {"round": 1, "alive": [2], "dropped": []}, {**state, "stage": "unmask"})
    with pytest.raises(SecAggError, match="round 2"):
        respond("unmask", {"round": 2, "alive": [2], "dropped": []}, state)


def test_no_individual_input_in_what_the_server_sees():
    nodes = [2, 3, 4]
    out, inputs, fed = run(nodes, threshold=2)
    seen = [out.collect_replies[n]["masked"] for n in nodes]
    for n in nodes:
        plain = inputs[n].astype("<u4").tobytes()
        assert all(plain != s for s in seen)
