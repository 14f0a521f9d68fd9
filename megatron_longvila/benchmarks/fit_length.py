"""The longest sequence one training step fits, on a number of GPUs, by the cost model's memory
formulas (those ``tests/test_memory_model.py`` checks against measurement).

For each layout of ``gpus`` ranks on one sequence (tp × ulysses inside a node, ring across nodes;
dp = pp = 1) and each optimizer sharding, the largest sequence (a multiple of ``step`` tokens)
whose :func:`cost_model.memory_per_rank` total fits ``usable_bytes``; the best layout wins.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from megatron_longvila.benchmarks import cost_model
from megatron_longvila.benchmarks.workload import GPTShape, Strategy
from megatron_longvila.models.config import LLMConfig, MemoryConfig

GIB = 1 << 30
# H100 SXM: 80 GB of HBM3 (79.6 GiB as CUDA reports it), less ~4.6 GiB for the CUDA context,
# NCCL buffers and allocator fragmentation (an assumption, not a measurement).
H100_USABLE_BYTES = 75 * GIB


def shape_of(llm: LLMConfig) -> GPTShape:
    """The cost model's shape of an LLM config (untied embeddings assumed)."""
    return GPTShape(
        layers=llm.num_layers,
        hidden=llm.hidden_size,
        heads=llm.num_heads,
        kv_heads=llm.num_kv_heads,
        ffn_hidden=llm.ffn_hidden_size,
        vocab=llm.padded_vocab_size,
    )


@dataclass(frozen=True)
class Fit:
    seq: int
    strategy: Strategy
    sharding: str
    memory_bytes: dict[str, int]


def layouts(gpus: int, shape: GPTShape, gpus_per_node: int = 8) -> list[Strategy]:
    """Every tp × ulysses × ring of ``gpus`` with tp × ulysses within a node that splits the
    heads (kv heads replicated where Ulysses exceeds them)."""
    found = []
    for tp in (1, 2, 4, 8):
        for ulysses in (1, 2, 4, 8):
            inner = tp * ulysses
            if inner > gpus_per_node or gpus % inner:
                continue
            ring = gpus // inner
            kind = "2D" if tp == 1 else "CP+TP"  # tp > 1: the memory formulas are the same
            if tp > 1 and ulysses > 1:
                continue  # not a Strategy kind of the workload model yet
            strategy = Strategy(kind, tp=tp, ulysses=ulysses, ring=ring)
            try:
                strategy.check(shape)
            except ValueError:
                continue
            found.append(strategy)
    return found


def longest_sequence(
    shape: GPTShape,
    gpus: int,
    usable_bytes: int = H100_USABLE_BYTES,
    memory: MemoryConfig = cost_model.MODEL_MEMORY_OPTIONS,
    kernels: cost_model.Kernels = cost_model.FUSED_KERNELS,
    shardings: tuple[str, ...] = ("zero1", "zero3"),
    step: int = 8192,
) -> Fit | None:
    """The longest fitting sequence of one step without layer recomputation (None: none fits)."""
    best: Fit | None = None
    for strategy in layouts(gpus, shape):
        for sharding in shardings:
            training = cost_model.Training(sharding=sharding, tp_sequence_parallel=strategy.tp > 1)

            def parts(seq: int, strategy=strategy, training=training) -> dict[str, int]:
                return cost_model.memory_per_rank(
                    shape,
                    strategy,
                    1,
                    seq,
                    cost_model.Precision(),
                    training,
                    kernels=kernels,
                    memory=memory,
                )

            seq = _largest_fitting(parts, math.lcm(step, 2 * strategy.sp), usable_bytes)
            if seq and (best is None or seq > best.seq):
                best = Fit(seq, strategy, sharding, parts(seq))
    return best


def _largest_fitting(parts, unit: int, usable_bytes: int) -> int:
    """The largest multiple of ``unit`` whose ``parts(seq)["total"]`` fits (0: none)."""

    def fits(units: int) -> bool:
        return parts(units * unit)["total"] <= usable_bytes

    low, high = 0, 1  # fits(low); at the end of the doubling, not fits(high)
    while fits(high):
        low, high = high, 2 * high
    while high - low > 1:
        middle = (low + high) // 2
        if fits(middle):
            low = middle
        else:
            high = middle
    return low * unit
