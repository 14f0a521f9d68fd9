"""Predicted step time and memory of a strategy on a described cluster.

The work comes from :mod:`.cost_model` (exact FLOPs, the bytes comm_stats measures, the memory
formulas); the cluster turns it into seconds:

* compute: GEMM FLOPs at ``peak_flops × gemm_efficiency × w/(w + gemm_half_width)``, ``w`` the
  narrowest dimension of a rank's GEMMs (its tokens, or the tp shard of the QKV, projection or
  MLP width); attention FLOPs at ``peak_flops × attention_efficiency × q/(q +
  attention_half_tokens)``, ``q`` the query tokens of the block a ring step computes; each ring
  step also costs ``ring_step_seconds`` (kernel launches, the log-sum-exp merge). Elementwise
  work is folded into the efficiencies;
* links: a message costs ``latency + bytes / bandwidth``; ``intra_node`` is a GPU's NVLink,
  ``inter_node`` its own NIC. Ranks are placed tp innermost, then Ulysses, ring, dp, pp;
* collectives over ``N = g·m`` ranks (``g`` of them in each of ``m`` nodes) are hierarchical:
  a reduce-scatter or all-gather of a buffer ``S`` costs ``max(S(g−1)/g ÷ NVLink,
  S/g·(m−1)/m ÷ NIC)`` plus ``(g−1)`` NVLink and ``(m−1)`` NIC latencies (the intra-node ring and
  the inter-node ring over the node's ``g`` NICs run pipelined); an all-reduce is both, twice the
  cost; an all-to-all sends ``(g−1)/N`` of its buffer over NVLink and ``(N−g)/N`` over the NIC;
* a K/V ring that leaves a node is as slow as its inter-node hop; each ring step runs a block's
  attention while the next K/V (and, backward, the dK/dV accumulator) travel:
  ``max(c, x) + (1 − overlap)·min(c, x)``. Ulysses all-to-alls and TP collectives sit on the
  critical path (Megatron's defaults);
* a step is ``micro_batches`` micro-batches of ``batch`` sequences. With ``pp`` stages (1F1B) it
  takes ``micro_batches + pp − 1`` slots of the slowest stage (``L/pp`` layers and the output
  layer) and two activation hops per slot. The gradient reduction runs once per step (ZeRO-3:
  its gathers and reduce-scatter once per micro-batch); with ``Training.overlap_grad_sync`` it
  hides behind the last micro-batch's backward (ZeRO-3: behind every micro-batch's compute);
* full recomputation adds each layer's forward once more.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace

from megatron_longvila.core.topology import replicated_kv_heads
from megatron_longvila.models.config import MemoryConfig
from megatron_longvila.planning import cost_model
from megatron_longvila.planning.cost_model import Precision, Training
from megatron_longvila.planning.workload import GPTShape, Strategy

COLLECTIVE_PASSES = {"all_reduce": 2, "reduce_scatter": 1, "all_gather": 1}


@dataclass(frozen=True)
class Link:
    """Per rank, one direction: ``bandwidth`` bytes/s, ``latency`` s per message."""

    bandwidth: float
    latency: float

    def seconds(self, nbytes: float, messages: float = 1) -> float:
        return messages * self.latency + nbytes / self.bandwidth


@dataclass(frozen=True)
class Cluster:
    """One kind of accelerator and network; the GPU count is the strategy's world size.

    ``attention_half_tokens`` / ``gemm_half_width``: the block (query tokens) and GEMM width at
    which the kernels run at half their large-size efficiency (0: flat); ``ring_step_seconds``:
    the fixed cost of one ring step, forward or backward.
    """

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
    attention_half_tokens: float = 0.0
    gemm_half_width: float = 0.0
    ring_step_seconds: float = 0.0
    notes: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if not 0.0 <= self.overlap <= 1.0:
            raise ValueError(f"overlap must be within [0, 1], got {self.overlap}")

    def link(self, span: int) -> Link:
        """The link of a group whose ranks cover ``span`` consecutive ranks."""
        return self.intra_node if span <= self.gpus_per_node else self.inter_node

    def attention_rate(self, query_tokens: float) -> float:
        """FLOP/s of the attention kernel on a block of ``query_tokens`` queries."""
        return self.peak_flops * self.attention_efficiency * _saturation(
            query_tokens, self.attention_half_tokens
        )

    def gemm_rate(self, width: float) -> float:
        """FLOP/s of a GEMM whose narrowest dimension is ``width``."""
        return self.peak_flops * self.gemm_efficiency * _saturation(width, self.gemm_half_width)

    def collective_seconds(self, op: str, nbytes: float, ranks: int, per_node: int) -> float:
        """A hierarchical ring ``op`` (:data:`COLLECTIVE_PASSES` or ``all_to_all``) of a buffer of
        ``nbytes`` over ``ranks`` ranks, ``per_node`` of them in each node (module docstring)."""
        if ranks <= 1:
            return 0.0
        g = min(per_node, ranks)
        m = ranks // g
        nv, nic = self.intra_node, self.inter_node
        if op == "all_to_all":
            inside = nbytes * (g - 1) / ranks / nv.bandwidth
            outside = nbytes * (ranks - g) / ranks / nic.bandwidth
            return max(inside, outside) + (g - 1) * nv.latency + (ranks - g) * nic.latency
        passes = COLLECTIVE_PASSES[op]
        inside = nbytes * (g - 1) / g / nv.bandwidth
        outside = nbytes / g * (m - 1) / m / nic.bandwidth
        latency = (g - 1) * nv.latency + (m - 1) * nic.latency
        return passes * (max(inside, outside) + latency)

    def as_dict(self) -> dict:
        return asdict(self)


def _saturation(size: float, half: float) -> float:
    return 1.0 if half <= 0 else size / (size + half)


def _hidden(compute: float, transfer: float, overlap: float) -> float:
    """Time of compute and a concurrent transfer."""
    return max(compute, transfer) + (1.0 - overlap) * min(compute, transfer)


def _ring_seconds(
    shape: GPTShape, strategy: Strategy, batch: int, seq: int, cluster: Cluster, p: Precision
) -> tuple[float, float, float]:
    """(forward, backward, forward compute) seconds of one layer's ring attention on a rank."""
    r = strategy.ring
    flops = cost_model.attention_forward_flops_per_step(shape, strategy, batch, seq)
    block = seq // r  # query tokens of the diagonal step; the zigzag's other steps run half
    compute = [
        f / cluster.attention_rate(block if i == 0 else block / 2) for i, f in enumerate(flops)
    ]
    backward_factor = cost_model.BACKWARD_ATTENTION_FLOPS
    if r == 1:
        return compute[0], backward_factor * compute[0], compute[0]
    link = cluster.link(strategy.tp * strategy.sp)
    kv_heads = replicated_kv_heads(shape.kv_heads // strategy.tp, strategy.ulysses)
    elements = 2 * batch * block * (kv_heads // strategy.ulysses) * shape.head_dim
    kv, dkv = link.seconds(elements * p.activation), link.seconds(elements * p.ring_grad)
    step = cluster.ring_step_seconds
    forward = sum(
        step + _hidden(c, kv if i < r - 1 else 0.0, cluster.overlap) for i, c in enumerate(compute)
    )
    backward = dkv  # the last accumulator hop home has nothing to hide behind
    for i, c in enumerate(compute):
        transfer = (kv if i < r - 1 else 0.0) + (dkv if i > 0 else 0.0)
        backward += step + _hidden(backward_factor * c, transfer, cluster.overlap)
    return forward, backward, sum(compute)


def stage_shape(shape: GPTShape, pp: int) -> GPTShape:
    """The slowest, largest pipeline stage: ``L/pp`` layers, and the embedding and output layer
    (an upper bound for the middle stages)."""
    if shape.layers % pp:
        raise ValueError(f"{shape.layers} layers are not divisible by pp={pp}")
    return replace(shape, layers=shape.layers // pp)


def _gemm_width(shape: GPTShape, strategy: Strategy, batch: int, seq: int) -> int:
    t, d = strategy.tp, shape.head_dim
    widths = ((shape.heads + 2 * shape.kv_heads) * d, shape.heads * d, shape.ffn_hidden)
    return min([cost_model.tokens_per_rank(batch, seq, strategy)] + [w // t for w in widths])


def _gradient_sync_seconds(
    shape: GPTShape, strategy: Strategy, cluster: Cluster, precision: Precision, training: Training
) -> float:
    """One gradient reduction over the dp × sp group (its members are ``tp`` ranks apart)."""
    per_node = max(1, cluster.gpus_per_node // strategy.tp)
    return sum(
        cluster.collective_seconds(op, size, strategy.grad_group, per_node)
        for op, size in cost_model.gradient_sync_collectives(shape, strategy, precision, training)
    )


def predict_step(
    shape: GPTShape,
    strategy: Strategy,
    batch: int,
    seq: int,
    cluster: Cluster,
    precision: Precision,
    training: Training,
    micro_batches: int = 1,
) -> dict[str, float]:
    """Seconds of one optimizer step (the same on every rank), by part, and ``"total"``:
    ``micro_batches`` micro-batches of ``batch`` sequences of ``seq`` tokens on each dp rank."""
    strategy.check(shape)
    shape = stage_shape(shape, strategy.pp)
    nbytes = cost_model.step_bytes_per_rank(shape, strategy, batch, seq, precision, training)
    layers, t, u, e = shape.layers, strategy.tp, strategy.ulysses, precision.activation
    gemm_rate = cluster.gemm_rate(_gemm_width(shape, strategy, batch, seq))
    gemm_forward = cost_model.gemm_flops_per_layer(shape, strategy, batch, seq) / gemm_rate
    head = 3 * cost_model.output_layer_flops(shape, strategy, batch, seq) / gemm_rate
    ring_forward, ring_backward, attention_forward = _ring_seconds(
        shape, strategy, batch, seq, cluster, precision
    )
    # Four all-to-alls (q, k, v, output) forward and four backward per layer.
    ulysses = 0.0
    if u > 1:
        per_layer = nbytes["ulysses"] / (8 * layers) * u / (u - 1)  # one all-to-all's buffer
        per_node = max(1, cluster.gpus_per_node // t)
        ulysses = 8 * layers * cluster.collective_seconds("all_to_all", per_layer, u, per_node)
    # Four all-reduces per layer, one at each end of the model, three small ones in the loss;
    # with TP sequence parallelism ten gathers/scatters per layer and five at the ends instead
    # (each all-gather or reduce-scatter counts t−1 messages, each all-reduce 2(t−1)).
    tp = 0.0
    if t > 1:
        messages = (10 * layers + 11 if training.tp_sequence_parallel else 8 * layers + 10) * (
            t - 1
        )
        tp = cluster.link(t).seconds(nbytes["tp"], messages)
    backward_compute = layers * (
        2 * gemm_forward + cost_model.BACKWARD_ATTENTION_FLOPS * attention_forward
    )
    sync = _gradient_sync_seconds(shape, strategy, cluster, precision, training)
    if training.sharding == "zero3":
        # ZeRO-3 gathers the weights and reduce-scatters the gradients in every micro-batch,
        # ahead of the forward's layers and during the backward.
        hiding = backward_compute + layers * (gemm_forward + attention_forward)
        if training.overlap_grad_sync:
            sync -= min(sync, hiding) * cluster.overlap
        sync *= micro_batches
    elif training.overlap_grad_sync:
        sync -= min(sync, backward_compute) * cluster.overlap  # the last micro-batch's backward
    slots = micro_batches + strategy.pp - 1
    pipeline = 0.0
    if strategy.pp > 1:
        activation = cost_model.tokens_per_rank(batch, seq, strategy) * shape.hidden * e
        pipeline = slots * 2 * cluster.link(strategy.world).seconds(activation)
    parts = {
        "gemm": layers * 3 * gemm_forward + head,
        "attention_compute": layers * (1 + cost_model.BACKWARD_ATTENTION_FLOPS) * attention_forward,
        "ring_exposed": layers * (ring_forward + ring_backward)
        - layers * (1 + cost_model.BACKWARD_ATTENTION_FLOPS) * attention_forward,
        "ulysses_all_to_all": ulysses,
        "tensor_parallel": tp,
        "recompute": 0.0,
    }
    if training.recompute:
        parts["recompute"] = layers * (gemm_forward + ring_forward) + (ulysses + tp) / 2
    parts = {name: slots * value for name, value in parts.items()}
    parts["pipeline_p2p"] = pipeline
    parts["gradient_sync"] = sync
    parts["total"] = sum(parts.values())
    return parts


def step_memory(
    shape: GPTShape,
    strategy: Strategy,
    batch: int,
    seq: int,
    precision: Precision,
    training: Training,
    memory_options: MemoryConfig = cost_model.MODEL_MEMORY_OPTIONS,
) -> dict[str, int]:
    """Peak bytes per GPU by part (:func:`cost_model.memory_per_rank` of the largest pipeline
    stage, with the model's ``memory_options``); with ``pp`` stages under 1F1B the first stage
    keeps ``pp`` micro-batches' activations."""
    memory = cost_model.memory_per_rank(
        stage_shape(shape, strategy.pp),
        strategy,
        batch,
        seq,
        precision,
        training,
        memory=memory_options,
    )
    if strategy.pp > 1:
        extra = (strategy.pp - 1) * memory["activations"]
        memory = memory | {"activations": memory["activations"] + extra}
        memory["total"] += extra
    return memory


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
    memory = step_memory(shape, strategy, batch, seq, precision, training)
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
