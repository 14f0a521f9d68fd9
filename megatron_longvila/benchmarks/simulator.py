"""Predicted step time and memory of each strategy on a described cluster.

The work comes from :mod:`.cost_model` (exact FLOPs and the bytes comm_stats measures); the
cluster turns it into seconds:

* compute: GEMM FLOPs at ``peak_flops × gemm_efficiency``, attention FLOPs at
  ``peak_flops × attention_efficiency`` (elementwise work is folded into these efficiencies);
* a message over a link costs ``latency + bytes / bandwidth``; a group whose ranks fit in one node
  uses the intra-node link (NVLink), any other the inter-node link (InfiniBand, per-GPU NIC). Ranks
  are placed tp innermost, then Ulysses, then ring, so a ``tp × ulysses`` block sits in one node;
  a ring that leaves the node is as slow as its inter-node hops (every hop waits for the slowest);
* collectives of ``n`` ranks: all-to-all and all-gather/reduce-scatter ``(n−1)`` latencies, ring
  all-reduce ``2(n−1)``, plus their bytes (the bytes one rank sends) over the bandwidth;
* overlap: each ring step runs a block's attention while the next K/V (and, backward, the dK/dV
  accumulator) travel: ``max(c, x) + (1 − overlap)·min(c, x)``; with
  ``Training.overlap_grad_sync`` the gradient reduction hides behind the backward's compute the
  same way (ZeRO-3's weight gathers behind the forward's too); Ulysses all-to-alls and
  tensor-parallel collectives sit on the critical path (Megatron's defaults);
* full recomputation adds each layer's forward once more.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from megatron_longvila.benchmarks import cost_model
from megatron_longvila.benchmarks.cost_model import Precision, Training
from megatron_longvila.benchmarks.workload import GPTShape, Strategy
from megatron_longvila.core.topology import replicated_kv_heads


@dataclass(frozen=True)
class Link:
    """Per-rank, one direction: ``bandwidth`` bytes/s, ``latency`` s per message."""

    bandwidth: float
    latency: float

    def seconds(self, nbytes: float, messages: float = 1) -> float:
        return messages * self.latency + nbytes / self.bandwidth


@dataclass(frozen=True)
class Cluster:
    """One kind of accelerator and network; the GPU count is the strategy's world size."""

    name: str
    gpus_per_node: int
    peak_flops: float
    gemm_efficiency: float
    attention_efficiency: float
    intra_node: Link
    inter_node: Link
    overlap: float
    memory_bytes: float
    memory_usable: float = 0.9  # of memory_bytes (allocator fragmentation, CUDA context, buffers)
    notes: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if not 0.0 <= self.overlap <= 1.0:
            raise ValueError(f"overlap must be within [0, 1], got {self.overlap}")

    def link(self, span: int) -> Link:
        """The link of a group whose ranks cover ``span`` consecutive ranks."""
        return self.intra_node if span <= self.gpus_per_node else self.inter_node

    def as_dict(self) -> dict:
        return asdict(self)


def _hidden(compute: float, transfer: float, overlap: float) -> float:
    """Time of compute and a concurrent transfer."""
    return max(compute, transfer) + (1.0 - overlap) * min(compute, transfer)


def _ring_seconds(
    shape: GPTShape, strategy: Strategy, batch: int, seq: int, cluster: Cluster, p: Precision
) -> tuple[float, float, float]:
    """(forward, backward, forward compute) seconds of one layer's ring attention on a rank."""
    rate = cluster.peak_flops * cluster.attention_efficiency
    flops = cost_model.attention_forward_flops_per_step(shape, strategy, batch, seq)
    compute = [f / rate for f in flops]
    backward_factor = cost_model.BACKWARD_ATTENTION_FLOPS
    r = strategy.ring
    if r == 1:
        return compute[0], backward_factor * compute[0], compute[0]
    link = cluster.link(strategy.world)
    kv_heads = replicated_kv_heads(shape.kv_heads // strategy.tp, strategy.ulysses)
    block = 2 * batch * (seq // r) * (kv_heads // strategy.ulysses) * shape.head_dim
    kv, dkv = link.seconds(block * p.activation), link.seconds(block * p.ring_grad)
    forward = sum(
        _hidden(c, kv if i < r - 1 else 0.0, cluster.overlap) for i, c in enumerate(compute)
    )
    backward = dkv  # the last accumulator hop home has nothing to hide behind
    for i, c in enumerate(compute):
        transfer = (kv if i < r - 1 else 0.0) + (dkv if i > 0 else 0.0)
        backward += _hidden(backward_factor * c, transfer, cluster.overlap)
    return forward, backward, sum(compute)


def predict_step(
    shape: GPTShape,
    strategy: Strategy,
    batch: int,
    seq: int,
    cluster: Cluster,
    precision: Precision,
    training: Training,
) -> dict[str, float]:
    """Seconds of one training step (the same on every rank), by part, and ``"total"``."""
    strategy.check(shape)
    nbytes = cost_model.step_bytes_per_rank(shape, strategy, batch, seq, precision, training)
    layers, t, u, n = shape.layers, strategy.tp, strategy.ulysses, strategy.sp
    gemm_rate = cluster.peak_flops * cluster.gemm_efficiency
    gemm_forward = cost_model.gemm_flops_per_layer(shape, strategy, batch, seq) / gemm_rate
    head = 3 * cost_model.output_layer_flops(shape, strategy, batch, seq) / gemm_rate
    ring_forward, ring_backward, attention_forward = _ring_seconds(
        shape, strategy, batch, seq, cluster, precision
    )
    # Four all-to-alls (q, k, v, output) forward and four backward per layer.
    ulysses = 0.0
    if u > 1:
        ulysses = cluster.link(t * u).seconds(nbytes["ulysses"], layers * 8 * (u - 1))
    # Four all-reduces per layer, one at each end of the model, three small ones in the loss;
    # with TP sequence parallelism ten gathers/scatters per layer and five at the ends instead
    # (each all-gather or reduce-scatter counts t−1 messages, each all-reduce 2(t−1)).
    tp = 0.0
    if t > 1:
        messages = (10 * layers + 11 if training.tp_sequence_parallel else 8 * layers + 10) * (
            t - 1
        )
        tp = cluster.link(t).seconds(nbytes["tp"], messages)
    sync = cluster.link(strategy.world).seconds(nbytes["dp"], 2 * (n - 1)) if n > 1 else 0.0
    if training.overlap_grad_sync:
        # Gradient buckets leave during the backward; ZeRO-3 also gathers weights ahead of the
        # forward's layers.
        hiding = layers * (
            2 * gemm_forward + cost_model.BACKWARD_ATTENTION_FLOPS * attention_forward
        )
        if training.sharding == "zero3":
            hiding += layers * (gemm_forward + attention_forward)
        sync -= min(sync, hiding) * cluster.overlap
    parts = {
        "gemm": layers * 3 * gemm_forward + head,
        "attention_compute": layers * (1 + cost_model.BACKWARD_ATTENTION_FLOPS) * attention_forward,
        "ring_exposed": layers * (ring_forward + ring_backward)
        - layers * (1 + cost_model.BACKWARD_ATTENTION_FLOPS) * attention_forward,
        "ulysses_all_to_all": ulysses,
        "tensor_parallel": tp,
        "gradient_sync": sync,
        "recompute": 0.0,
    }
    if training.recompute:
        parts["recompute"] = layers * (gemm_forward + ring_forward) + (ulysses + tp) / 2
    parts["total"] = sum(parts.values())
    return parts


def fits(
    shape: GPTShape,
    strategy: Strategy,
    batch: int,
    seq: int,
    cluster: Cluster,
    precision: Precision,
    training: Training,
) -> bool:
    """Whether one step's peak memory per rank fits in the usable memory of a GPU."""
    memory = cost_model.memory_per_rank(shape, strategy, batch, seq, precision, training)
    return memory["total"] <= cluster.memory_bytes * cluster.memory_usable


def longest_sequence(
    shape: GPTShape,
    strategy: Strategy,
    cluster: Cluster,
    precision: Precision,
    training: Training,
    granularity: int = 1024,
    limit: int = 1 << 26,
) -> int:
    """The longest sequence, a multiple of ``lcm(2·sp, granularity)`` up to ``limit``, whose step
    fits in memory (batch 1); 0 if none does."""
    unit = math.lcm(2 * strategy.sp, granularity)
    low, high = 0, limit // unit
    while low < high:
        mid = (low + high + 1) // 2
        if fits(shape, strategy, 1, mid * unit, cluster, precision, training):
            low = mid
        else:
            high = mid - 1
    return low * unit
