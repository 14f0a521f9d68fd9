"""The cluster model's link and kernel pricing, and the planner's search, choice and refusal.

References, written out in each test: collective times computed by hand from the hierarchical
formula (module docstring of ``simulator``); the ring's fixed step cost and the efficiency curve
recomputed from FLOPs; a pipelined step equal to its slots times one stage's micro-batch; the
planner's choice against a brute-force enumeration written here; refusals naming the missing
resource. Tolerance: 1e-9 relative (floating point only). Pure Python, no ranks.
"""

from __future__ import annotations

import math
from dataclasses import replace

import pytest

from megatron_longvila.benchmarks.scaling_study import H100_NODES
from megatron_longvila.planning import cost_model, planner, simulator
from megatron_longvila.planning.cost_model import Precision, Training
from megatron_longvila.planning.planner import NoLayoutFits, Search, Workload
from megatron_longvila.planning.simulator import Link
from megatron_longvila.planning.workload import QWEN2_7B, GPTShape, Strategy

GiB = 2**30
SHAPE = GPTShape(layers=4, hidden=512, heads=8, kv_heads=4, ffn_hidden=1024, vocab=1024)
BF16 = Precision(activation=2, weight=2)
NV, NIC = Link(bandwidth=300e9, latency=4e-6), Link(bandwidth=40e9, latency=9e-6)
FLAT = replace(
    H100_NODES,
    intra_node=NV,
    inter_node=NIC,
    gpus_per_node=4,
    attention_half_tokens=0,
    gemm_half_width=0,
    ring_step_seconds=0,
)
FREE = Link(bandwidth=math.inf, latency=0.0)


def test_collectives_are_hierarchical():
    s = 3e8
    # 32 ranks, 8 per node: 7/8 of S over NVLink, S/8 · 3/4 over each GPU's NIC, pipelined.
    rs = max(s * 7 / 8 / NV.bandwidth, s / 8 * 3 / 4 / NIC.bandwidth) + 7 * 4e-6 + 3 * 9e-6
    assert FLAT.collective_seconds("reduce_scatter", s, 32, 8) == pytest.approx(rs, rel=1e-9)
    assert FLAT.collective_seconds("all_gather", s, 32, 8) == pytest.approx(rs, rel=1e-9)
    assert FLAT.collective_seconds("all_reduce", s, 32, 8) == pytest.approx(2 * rs, rel=1e-9)
    # One rank per node (tp = 8 groups): the NIC carries (m-1)/m of S.
    one = s * 3 / 4 / NIC.bandwidth + 3 * 9e-6
    assert FLAT.collective_seconds("reduce_scatter", s, 4, 1) == pytest.approx(one, rel=1e-9)
    # Inside one node: NVLink only.
    inside = s * 3 / 4 / NV.bandwidth + 3 * 4e-6
    assert FLAT.collective_seconds("all_gather", s, 4, 8) == pytest.approx(inside, rel=1e-9)
    # All-to-all over 16 ranks, 4 per node: 3/16 of the buffer over NVLink, 12/16 over the NIC.
    a2a = max(s * 3 / 16 / NV.bandwidth, s * 12 / 16 / NIC.bandwidth) + 3 * 4e-6 + 12 * 9e-6
    assert FLAT.collective_seconds("all_to_all", s, 16, 4) == pytest.approx(a2a, rel=1e-9)
    assert FLAT.collective_seconds("all_reduce", s, 1, 4) == 0.0


@pytest.mark.parametrize("tp", [1, 4])
def test_gradient_sync_runs_over_the_tp_strided_group(tp):
    """zero1 over dp × sp = 8 ranks whose members sit tp apart: 4/tp of them per node."""
    strategy = Strategy("CP+TP" if tp > 1 else "ring-only", tp=tp, ring=8 // tp * 2, dp=1)
    training = Training(sharding="zero1")
    seq = 4096
    step = simulator.predict_step(SHAPE, strategy, 1, seq, FLAT, BF16, training)
    p = cost_model.params_per_rank(SHAPE, tp)
    n, g = strategy.grad_group, 4 // tp
    m = n // g

    def hierarchical(size):
        inside = size * (g - 1) / g / NV.bandwidth
        outside = size / g * (m - 1) / m / NIC.bandwidth
        return max(inside, outside) + (g - 1) * NV.latency + (m - 1) * NIC.latency

    expected = hierarchical(4 * p) + hierarchical(2 * p)  # fp32 gradients, bf16 weights
    assert step["gradient_sync"] == pytest.approx(expected, rel=1e-9)


def test_small_blocks_run_slower_and_each_ring_step_costs_a_fixed_time():
    cluster = replace(
        FLAT, intra_node=FREE, inter_node=FREE, attention_half_tokens=512, ring_step_seconds=3e-5
    )
    assert cluster.attention_rate(512) == pytest.approx(cluster.attention_rate(1e12) / 2)
    strategy, seq = Strategy("ring-only", ring=4), 4096
    step = simulator.predict_step(SHAPE, strategy, 1, seq, cluster, BF16, Training())
    flops = cost_model.attention_forward_flops_per_step(SHAPE, strategy, 1, seq)
    block = seq // 4
    rate = cluster.peak_flops * cluster.attention_efficiency
    seconds = [f / (rate * q / (q + 512)) for f, q in zip(flops, [block] + [block / 2] * 3)]
    assert step["attention_compute"] == pytest.approx(SHAPE.layers * 3.5 * sum(seconds), rel=1e-9)
    # Free links: all that the ring adds is 4 forward and 4 backward steps of fixed cost.
    assert step["ring_exposed"] == pytest.approx(SHAPE.layers * 8 * 3e-5, rel=1e-9)


def test_narrow_tp_shards_slow_the_gemms():
    cluster = replace(FLAT, intra_node=FREE, inter_node=FREE, gemm_half_width=128)
    seq = 4096
    for tp in (1, 4):
        strategy = Strategy("CP+TP", tp=tp, ring=2) if tp > 1 else Strategy("ring-only", ring=2)
        step = simulator.predict_step(SHAPE, strategy, 1, seq, cluster, BF16, Training())
        width = min(seq // 2, 1024 // tp, 512 // tp)  # tokens, ffn/tp, (H or H+2G)·d/tp
        rate = cluster.peak_flops * cluster.gemm_efficiency * width / (width + 128)
        layers = SHAPE.layers * cost_model.gemm_flops_per_layer(SHAPE, strategy, 1, seq)
        flops = 3 * (layers + cost_model.output_layer_flops(SHAPE, strategy, 1, seq))
        assert step["gemm"] == pytest.approx(flops / rate, rel=1e-9)


def test_a_pipelined_step_is_its_slots_of_one_stage():
    """1F1B over 2 stages, 4 micro-batches: 5 slots of a 2-layer stage's micro-batch, plus two
    activation hops per slot; free links so nothing else differs."""
    cluster = replace(FLAT, intra_node=FREE, inter_node=FREE)
    training, seq = Training(sharding="zero1"), 4096
    piped = Strategy("2D", ulysses=2, ring=2, pp=2)
    step = simulator.predict_step(SHAPE, piped, 1, seq, cluster, BF16, training, micro_batches=4)
    half = replace(SHAPE, layers=2)
    one = simulator.predict_step(half, replace(piped, pp=1), 1, seq, cluster, BF16, training)
    for part in ("gemm", "attention_compute", "ulysses_all_to_all"):
        assert step[part] == pytest.approx(5 * one[part], rel=1e-9)
    memory = simulator.step_memory(SHAPE, piped, 1, seq, BF16, training)
    single = cost_model.memory_per_rank(half, replace(piped, pp=1), 1, seq, BF16, training)
    assert memory["activations"] == 2 * single["activations"]  # 2 micro-batches in flight


def _brute_force(workload: Workload, cluster, gpus: int, search: Search):
    """Seconds per token of the fastest fitting plan, by plain enumeration (written apart from
    the planner's own search)."""
    best = None
    usable = cluster.memory_bytes * cluster.memory_usable
    for tp in search.tp_choices:
        for u in range(1, gpus + 1):
            for r in range(1, gpus + 1):
                for pp in search.pp_choices:
                    if gpus % (tp * u * r * pp) or tp > cluster.gpus_per_node or u < 2:
                        continue
                    dp = gpus // (tp * u * r * pp)
                    strategy = Strategy("2D", tp=tp, ulysses=u, ring=r, dp=dp, pp=pp)
                    try:
                        strategy.check(workload.shape)
                        simulator.stage_shape(workload.shape, pp)
                    except ValueError:
                        continue
                    m = workload.micro_batches_at(dp)
                    if m is None or workload.seq % (2 * u * r):
                        continue
                    for sharding in search.shardings:
                        for recompute in search.recompute:
                            training = Training(sharding, recompute, tp > 1, True)
                            mem = simulator.step_memory(
                                workload.shape, strategy, 1, workload.seq, BF16, training
                            )["total"]
                            if mem > usable:
                                continue
                            args = (workload.shape, strategy, 1, workload.seq, cluster, BF16)
                            step = simulator.predict_step(*args, training, m)
                            per_token = step["total"] / (dp * m * workload.seq)
                            if best is None or per_token < best:
                                best = per_token
    return best


@pytest.mark.parametrize("shardings", [("zero1", "zero3"), ("zero3", "zero1")])
def test_the_choice_is_the_fastest_fitting_layout(shardings):
    """Every sharding is priced even when an earlier one fits (in either order)."""
    workload = Workload(SHAPE, 8192, sequences_per_step=4)
    search = Search(families=("MM-SP",), pp_choices=(1, 2), shardings=shardings)
    best, runner_up = planner.choose(workload, FLAT, 16, search)
    per_token = _brute_force(workload, FLAT, 16, search)
    assert best.seconds_per_token == pytest.approx(per_token, rel=1e-12)  # ties may differ
    assert best.memory["total"] <= FLAT.memory_bytes * FLAT.memory_usable
    assert runner_up is not None and runner_up.strategy != best.strategy
    assert runner_up.seconds_per_token >= best.seconds_per_token


def test_a_slow_network_keeps_each_sequence_inside_a_node():
    slow = replace(FLAT, inter_node=Link(bandwidth=1e8, latency=1e-4))
    workload = Workload(SHAPE, 8192, sequences_per_step=8)
    best, _ = planner.choose(workload, slow, 16, Search())
    s = best.strategy
    assert s.tp * s.sp * s.pp <= slow.gpus_per_node and s.dp >= 4


def test_heads_limit_the_layouts():
    """Qwen2-7B: 28 query heads and 4 kv heads: tp ∈ {1, 2, 4} (never 8), tp × ulysses divides
    28; on 56 GPUs tp 4 × ulysses 7 × ring 2 exists."""
    found = list(planner.layouts("MM-SP", 56, QWEN2_7B, H100_NODES, Search()))
    assert found and all(28 % (s.tp * s.ulysses) == 0 and 4 % s.tp == 0 for s in found)
    assert {s.tp for s in found} == {1, 2, 4}
    assert any(s.ulysses == 7 for s in found)


def _leanest(seq: int, gpus: int, search: Search, recompute: bool) -> int:
    """Least peak memory per GPU over the searched layouts, with or without recomputation."""
    return min(
        simulator.step_memory(SHAPE, s, 1, seq, BF16, Training(sh, recompute, s.tp > 1, True))[
            "total"
        ]
        for s in planner.layouts("MM-SP", gpus, SHAPE, FLAT, search)
        for sh in search.shardings
        if seq % (2 * s.sp) == 0
    )


def test_memory_decides_recomputation_and_then_refuses_naming_what_is_missing():
    seq, search = 1 << 15, Search(families=("MM-SP",))
    workload = Workload(SHAPE, seq, sequences_per_step=1)
    without, with_recompute = (_leanest(seq, 4, search, r) for r in (False, True))
    assert with_recompute < without
    # Usable memory one byte short of the leanest layout without recomputation.
    tight = replace(FLAT, memory_bytes=(without - 1) / FLAT.memory_usable)
    best, _ = planner.choose(workload, tight, 4, search)
    assert best.training.recompute
    short = replace(FLAT, memory_bytes=(with_recompute - 2**20) / FLAT.memory_usable)
    with pytest.raises(NoLayoutFits, match=r"short of GPU memory by 0\.0 GiB per GPU"):
        planner.choose(workload, short, 4, search)


def test_refusal_names_gpus_that_would_hold_it():
    long = Workload(SHAPE, 1 << 20, sequences_per_step=1)
    cluster = replace(FLAT, memory_bytes=2 * GiB)
    with pytest.raises(NoLayoutFits) as error:
        planner.choose(long, cluster, 4, Search(families=("MM-SP",)))
    more = int(str(error.value).rsplit("; ", 1)[1].split()[0])
    assert more > 4
    planner.choose(long, cluster, more, Search(families=("MM-SP",)))  # fits there
    with pytest.raises(NoLayoutFits):
        planner.choose(long, cluster, more // 2, Search(families=("MM-SP",)))


def test_refusal_when_no_layout_splits_the_workload():
    odd = Workload(SHAPE, 1001, sequences_per_step=1)
    with pytest.raises(NoLayoutFits, match="multiple of 2·sp"):
        planner.choose(odd, FLAT, 4, Search())
    with pytest.raises(ValueError, match="exactly one"):
        Workload(SHAPE, 1024)


def test_fit_length_table_is_the_last_length_that_fits():
    search = Search(families=("MM-SP",), pp_choices=(1,))
    cluster = replace(FLAT, memory_bytes=4 * GiB)
    (row,) = planner.fit_length_table({"small": SHAPE}, cluster, (8,), search)
    unit = math.lcm(2 * 8, 1024)
    for recompute in (False, True):
        tokens = row[f"recompute={recompute}"]["tokens"]
        limited = replace(search, recompute=(recompute,))
        assert tokens > 0 and row[f"recompute={recompute}"]["plan"]["recompute"] == recompute
        planner.choose(Workload(SHAPE, tokens, sequences_per_step=1), cluster, 8, limited)
        with pytest.raises(NoLayoutFits):
            longer = Workload(SHAPE, tokens + unit, sequences_per_step=1)
            planner.choose(longer, cluster, 8, limited)
    assert row["recompute=True"]["tokens"] > row["recompute=False"]["tokens"]
