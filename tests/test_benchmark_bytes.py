"""The simulator's byte and FLOP formulas equal what one measured training step moves and computes.

Under test: :func:`cost_model.step_bytes_per_rank` (the simulator's traffic, built on comm_stats'
formulas) and :func:`cost_model.attention_forward_flops_per_step`. Reference: one real training
step of megatron-core's GPTModel per strategy on gloo ranks (``gpt_step.measure_strategy``), its
bytes counted by ``comm_stats.counting`` — MM-SP's own transfers by its wrappers, megatron-core's
tensor-parallel collectives and DDP gradient reduction at the dispatcher — and its attention FLOPs
by ``kernels.counting_flops``. Every strategy (ring-only, Ulysses-only, every 2D split, CP+TP) at
sp 2, 4 and 8, two model shapes (GQA kv heads split and replicated). Tolerance: exact (bytes and
FLOPs are integers), on every rank and every group.
"""

from __future__ import annotations

import pytest

from megatron_longvila.benchmarks.gpt_step import StepSettings, measure_strategy
from megatron_longvila.planning import cost_model
from megatron_longvila.planning.cost_model import Precision
from megatron_longvila.planning.workload import GPTShape, strategies_for

SHAPES = {
    # kv heads split over tp × ulysses where they can be, replicated where ulysses exceeds them
    "gqa4": GPTShape(layers=1, hidden=64, heads=8, kv_heads=4, ffn_hidden=48, vocab=64),
    "mqa-2layers": GPTShape(layers=2, hidden=64, heads=8, kv_heads=1, ffn_hidden=80, vocab=96),
}
SETTINGS = StepSettings(seq=48, repeats=0, warmup=0)  # 48: a multiple of 2·sp for sp 2, 4, 8
WORLDS = (2, 4, 8)


def _cases():
    for world in WORLDS:
        for shape_name, shape in SHAPES.items():
            for strategy in strategies_for(world, shape):
                yield pytest.param(world, shape_name, strategy, id=f"{shape_name}-{strategy.label}")


@pytest.fixture(scope="module")
def measured(rank_pools):
    """{(shape name, strategy): per-rank results}; pools in ascending world size."""
    results = {}
    for world in WORLDS:
        pool = rank_pools(world)
        for shape_name, shape in SHAPES.items():
            for strategy in strategies_for(world, shape):
                results[shape_name, strategy] = pool.run(
                    measure_strategy, shape, strategy, SETTINGS, True
                )
    return results


def test_every_strategy_is_covered():
    labels = {
        s.label for w in WORLDS for shape in SHAPES.values() for s in strategies_for(w, shape)
    }
    assert labels == {
        "ring-only 2", "ulysses-only 2",
        "ring-only 4", "ulysses-only 4", "2D 2×2", "CP+TP tp2×cp2",
        "ring-only 8", "ulysses-only 8", "2D 2×4", "2D 4×2", "CP+TP tp2×cp4", "CP+TP tp4×cp2",
    }  # fmt: skip


@pytest.mark.parametrize("world, shape_name, strategy", list(_cases()))
def test_bytes_equal_formulas(measured, world, shape_name, strategy):
    shape = SHAPES[shape_name]
    expected = cost_model.step_bytes_per_rank(
        shape, strategy, SETTINGS.batch, SETTINGS.seq, Precision.of(SETTINGS.dtype)
    )
    for rank, result in enumerate(measured[shape_name, strategy]):
        assert result["bytes_by_group"] == expected, (rank, result["bytes_by_op"])
    # Not vacuous: the groups this strategy uses moved something.
    assert expected["dp"] > 0
    assert (expected["ulysses"] > 0) == (strategy.ulysses > 1)
    assert (expected["ring"] > 0) == (strategy.ring > 1)
    assert (expected["tp"] > 0) == (strategy.tp > 1)


@pytest.mark.parametrize("world, shape_name, strategy", list(_cases()))
def test_attention_flops_equal_formula(measured, world, shape_name, strategy):
    shape = SHAPES[shape_name]
    per_step = cost_model.attention_forward_flops_per_step(
        shape, strategy, SETTINGS.batch, SETTINGS.seq
    )
    for rank, result in enumerate(measured[shape_name, strategy]):
        assert result["attention_forward_flops"][rank] == shape.layers * sum(per_step), rank


def test_strategies_train_the_same_model(measured):
    """Same weights, same tokens: every strategy's loss equals ring-only's (fp32, 1e-5)."""
    for (shape_name, strategy), results in measured.items():
        reference = measured[shape_name, strategies_for(strategy.world, SHAPES[shape_name])[0]]
        assert results[0]["loss"] == pytest.approx(reference[0]["loss"], abs=1e-5), strategy
