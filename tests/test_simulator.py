"""The cluster simulator: its time model against hand calculations, its memory search, its fits.

References are written out in each test: step times recomputed by hand from the cost model's
FLOPs and bytes under limiting clusters (free links, no overlap, full overlap), the link fit on
samples generated from a known link, and the definition of the longest sequence (fits at the
answer, not one unit above). Tolerance: 1e-9 relative (floating point only).
"""

from __future__ import annotations

import math
from dataclasses import replace

import pytest

from megatron_longvila.benchmarks.calibration import fit_link
from megatron_longvila.benchmarks.scaling_study import H100_NODES, paper_study
from megatron_longvila.planning import cost_model, simulator
from megatron_longvila.planning.cost_model import Precision, Training
from megatron_longvila.planning.simulator import Link
from megatron_longvila.planning.workload import LLAMA3_8B, GPTShape, Strategy

SHAPE = GPTShape(layers=4, hidden=512, heads=8, kv_heads=4, ffn_hidden=1024, vocab=1000)
SEQ = 8192
BF16 = Precision(activation=2, weight=2)
FREE = Link(bandwidth=math.inf, latency=0.0)
# Flat kernel efficiencies and no per-step ring cost, so compute is FLOPs / rate.
CLUSTER = replace(
    H100_NODES,
    intra_node=FREE,
    inter_node=FREE,
    attention_half_tokens=0,
    gemm_half_width=0,
    ring_step_seconds=0,
)
STRATEGIES = [
    Strategy("ring-only", ring=16),
    Strategy("ulysses-only", ulysses=8),
    Strategy("2D", ulysses=8, ring=2),
    Strategy("CP+TP", tp=4, ring=4),
]


def _compute_seconds(strategy: Strategy, cluster: simulator.Cluster) -> float:
    gemm = cluster.peak_flops * cluster.gemm_efficiency
    attention = cluster.peak_flops * cluster.attention_efficiency
    forward_attention = sum(cost_model.attention_forward_flops_per_step(SHAPE, strategy, 1, SEQ))
    return (
        3 * SHAPE.layers * cost_model.gemm_flops_per_layer(SHAPE, strategy, 1, SEQ) / gemm
        + 3 * cost_model.output_layer_flops(SHAPE, strategy, 1, SEQ) / gemm
        + 3.5 * SHAPE.layers * forward_attention / attention
    )


@pytest.mark.parametrize("strategy", STRATEGIES, ids=lambda s: s.label)
def test_free_links_leave_only_compute(strategy):
    step = simulator.predict_step(SHAPE, strategy, 1, SEQ, CLUSTER, BF16, Training())
    assert step["total"] == pytest.approx(_compute_seconds(strategy, CLUSTER), rel=1e-9)
    assert step["ring_exposed"] == pytest.approx(0.0, abs=1e-12)


def test_ring_hops_hide_behind_compute_only_with_overlap():
    """One slow link, ring of 4 in one node: exposed ring time by hand for overlap 0 and 1."""
    strategy = Strategy("ring-only", ring=4)
    link = Link(bandwidth=1e9, latency=1e-5)
    cluster = replace(CLUSTER, intra_node=link, inter_node=link)
    block = 2 * (SEQ // 4) * SHAPE.kv_heads * SHAPE.head_dim  # K and V of one ring rank
    kv, dkv = link.seconds(2 * block), link.seconds(4 * block)
    rate = cluster.peak_flops * cluster.attention_efficiency
    compute = [
        f / rate for f in cost_model.attention_forward_flops_per_step(SHAPE, strategy, 1, SEQ)
    ]
    # Overlap 0: every hop adds to the time: 3 K/V hops forward, 3 K/V + 4 dK/dV backward.
    serial = replace(cluster, overlap=0.0)
    step = simulator.predict_step(SHAPE, strategy, 1, SEQ, serial, BF16, Training())
    assert step["ring_exposed"] == pytest.approx(SHAPE.layers * (6 * kv + 4 * dkv), rel=1e-9)
    # Overlap 1: each step costs max(compute, transfer); the last dK/dV hop stays exposed.
    full = replace(cluster, overlap=1.0)
    step = simulator.predict_step(SHAPE, strategy, 1, SEQ, full, BF16, Training())
    forward = sum(max(c, kv if i < 3 else 0) for i, c in enumerate(compute))
    backward = dkv + sum(
        max(2.5 * c, (kv if i < 3 else 0) + (dkv if i > 0 else 0)) for i, c in enumerate(compute)
    )
    expected = SHAPE.layers * (forward + backward - 3.5 * sum(compute))
    assert step["ring_exposed"] == pytest.approx(expected, rel=1e-9)


def test_all_to_all_inside_a_node_uses_nvlink_and_across_nodes_each_gpus_nic():
    """Ulysses inside a node of 4 costs NVLink time; Ulysses over 8 GPUs (2 nodes) sends 4 of
    each rank's 7 peer chunks over its own NIC and 3 over NVLink, concurrently."""
    slow, fast = Link(bandwidth=1e9, latency=0.0), Link(bandwidth=1e12, latency=0.0)
    cluster = replace(CLUSTER, intra_node=fast, inter_node=slow, gpus_per_node=4)
    inside = Strategy("2D", ulysses=4, ring=2)
    nbytes = cost_model.step_bytes_per_rank(SHAPE, inside, 1, SEQ, BF16)["ulysses"]
    step = simulator.predict_step(SHAPE, inside, 1, SEQ, cluster, BF16, Training())
    assert step["ulysses_all_to_all"] == pytest.approx(nbytes / fast.bandwidth, rel=1e-9)
    across = Strategy("ulysses-only", ulysses=8)
    nbytes = cost_model.step_bytes_per_rank(SHAPE, across, 1, SEQ, BF16)["ulysses"]
    step = simulator.predict_step(SHAPE, across, 1, SEQ, cluster, BF16, Training())
    expected = max(nbytes * 3 / 7 / fast.bandwidth, nbytes * 4 / 7 / slow.bandwidth)
    assert step["ulysses_all_to_all"] == pytest.approx(expected, rel=1e-9)


def _zero3(recompute: bool) -> Training:
    return Training(sharding="zero3", recompute=recompute, overlap_grad_sync=True)


def test_longest_sequence_is_the_last_that_fits():
    strategy = Strategy("2D", ulysses=8, ring=4)
    found = {}
    for recompute in (False, True):
        training = _zero3(recompute)
        length = simulator.longest_sequence(LLAMA3_8B, strategy, H100_NODES, BF16, training)
        unit = math.lcm(2 * strategy.sp, 1024)
        assert length > 0 and length % unit == 0
        assert simulator.fits(LLAMA3_8B, strategy, 1, length, H100_NODES, BF16, training)
        assert not simulator.fits(LLAMA3_8B, strategy, 1, length + unit, H100_NODES, BF16, training)
        found[recompute] = length
    assert found[True] > found[False]  # recomputation keeps one layer's activations, not all


def test_more_gpus_fit_longer_sequences():
    lengths = [
        simulator.longest_sequence(
            LLAMA3_8B, Strategy("2D", ulysses=8, ring=gpus // 8), H100_NODES, BF16, _zero3(False)
        )
        for gpus in (16, 32, 64)
    ]
    assert lengths == sorted(lengths) and lengths[0] < lengths[-1]


def test_link_fit_recovers_a_known_link():
    link = Link(bandwidth=2.5e8, latency=7e-4)
    samples = [(m, b, link.seconds(b, m)) for m in (1, 7, 14) for b in (1e5, 4e6)]
    fitted, worst = fit_link(samples)
    assert fitted.bandwidth == pytest.approx(link.bandwidth, rel=1e-9)
    assert fitted.latency == pytest.approx(link.latency, rel=1e-9)
    assert worst < 1e-9


def test_bad_sizes_are_refused_with_the_numbers():
    with pytest.raises(ValueError, match="not a multiple of 2·sp = 16"):
        cost_model.tokens_per_rank(1, 100, Strategy("2D", ulysses=2, ring=4))
    with pytest.raises(ValueError, match="8 heads are not divisible by tp×ulysses = 16"):
        Strategy("ulysses-only", ulysses=16).check(SHAPE)
    with pytest.raises(ValueError, match="without tensor parallelism"):
        Strategy("ring-only", tp=2, ring=2)
    with pytest.raises(ValueError, match="sharding"):
        Training(sharding="zero2")


def test_paper_study_states_its_assumptions_and_ranges():
    study = paper_study(gpu_counts=(32,), seqs=(128 * 1024,), memory_gpu_counts=(32,), sweep=False)
    assert study["paper_ranges"] == {"vs ring-only": (2.1, 5.7), "vs CP+TP": (1.1, 1.4)}
    assert set(study["predicted_ranges"]) == set(study["paper_ranges"])
    assert any("hierarchical" in a for a in study["assumptions"])
    assert any("zero3" in a for a in study["assumptions"])
    (cell,) = study["speed_grid"]
    best = {f: plans[0] for f, plans in cell["families"].items()}
    per_token = {f: p["step_s"] / p["tokens_per_step"] for f, p in best.items()}
    assert cell["vs ring-only"] == pytest.approx(per_token["ring-only"] / per_token["MM-SP"])
    assert cell["vs CP+TP"] == pytest.approx(per_token["CP+TP"] / per_token["MM-SP"])
