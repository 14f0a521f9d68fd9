"""The cost model's memory formulas equal what the model keeps, measured.

Measured (``benchmarks/layer_memory.py``, fp32 on CPU, the local layer spec): bytes one LLM
decoder layer keeps for its backward, per rank, at three shapes, with every memory option off
and with the model's defaults, at sp = 1, Ulysses 2 and ring 2; and the peak of the output layer
+ cross entropy at three (tokens, vocabulary) shapes, on all logits and in chunks. Predicted:
``cost_model.layer_activation_bytes`` with ``TORCH_KERNELS`` and ``cost_model.loss_peak_bytes``.
Tolerance: 2% relative.
"""

from __future__ import annotations

import pytest

from megatron_longvila.planning import cost_model
from megatron_longvila.planning.workload import GPTShape, Strategy

TOLERANCE = 0.02
FP32 = cost_model.Precision.of("float32")
SHAPES = [  # (shape, tokens per rank)
    (GPTShape(layers=1, hidden=256, heads=8, kv_heads=4, ffn_hidden=704, vocab=512), 256),
    (GPTShape(layers=1, hidden=128, heads=4, kv_heads=2, ffn_hidden=384, vocab=512), 192),
    (GPTShape(layers=1, hidden=192, heads=6, kv_heads=2, ffn_hidden=512, vocab=512), 128),
]
SPLITS = {"sp1": (1, 1), "ulysses2": (2, 1), "ring2": (1, 2)}
LOSS_SHAPES = [(512, 4096, 128), (1024, 32000, 256), (300, 8192, 128)]  # tokens, vocab, chunk


def _memory_settings():
    return {"none": cost_model.NO_MEMORY_OPTIONS, "defaults": cost_model.MODEL_MEMORY_OPTIONS}


def measure_layers(ulysses: int, ring: int) -> list[dict]:
    from megatron.core import parallel_state

    from megatron_longvila.benchmarks.layer_memory import saved_bytes_per_layer
    from megatron_longvila.core.parallel_state import MMSPTopology, initialize_mmsp

    initialize_mmsp(MMSPTopology(ulysses=ulysses, ring=ring))
    try:
        return [
            {"shape": i, "memory": name, "bytes": saved_bytes_per_layer(shape, tokens, memory)}
            for i, (shape, tokens) in enumerate(SHAPES)
            for name, memory in _memory_settings().items()
        ]
    finally:
        parallel_state.destroy_model_parallel()


def measure_loss() -> list[int]:
    from megatron.core import parallel_state

    from megatron_longvila.benchmarks.layer_memory import loss_peak_bytes

    parallel_state.initialize_model_parallel()
    try:
        return [
            loss_peak_bytes(GPTShape(1, 64, 4, 2, 128, vocab), tokens, chunk_tokens)
            for tokens, vocab, chunk in LOSS_SHAPES
            for chunk_tokens in (None, chunk)
        ]
    finally:
        parallel_state.destroy_model_parallel()


@pytest.mark.parametrize("split", list(SPLITS))
def test_layer_activation_bytes_match_measurement(rank_pools, split):
    ulysses, ring = SPLITS[split]
    # SPLITS has one level at a time: ring-only or Ulysses-only (sp = 1 included).
    strategy = (
        Strategy("ring-only", ring=ring) if ring > 1 else Strategy("ulysses-only", ulysses=ulysses)
    )
    measured = rank_pools(2).run(measure_layers, ulysses, ring)
    for row in measured[0]:
        shape, tokens = SHAPES[row["shape"]]
        predicted = cost_model.layer_activation_bytes(
            shape,
            strategy,
            batch=1,
            seq=tokens * ulysses * ring,
            precision=FP32,
            kernels=cost_model.TORCH_KERNELS,
            memory=_memory_settings()[row["memory"]],
        )
        error = abs(row["bytes"] - predicted) / predicted
        assert error <= TOLERANCE, (split, row, predicted, error)


def test_loss_peak_bytes_match_measurement(rank_pools):
    measured = rank_pools(2).run(measure_loss)[0]
    expected = [
        cost_model.loss_peak_bytes(tokens, vocab, 64, FP32, chunk_tokens, into_main_grad=False)
        for tokens, vocab, chunk in LOSS_SHAPES
        for chunk_tokens in (None, chunk)
    ]
    for got, want in zip(measured, expected):
        assert abs(got - want) / want <= TOLERANCE, (got, want)
