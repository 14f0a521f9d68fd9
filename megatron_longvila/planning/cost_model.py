"""Exact per-rank work of one training step: FLOPs, bytes sent by group, memory.

For a :class:`GPTShape`, a :class:`Strategy`, ``batch`` sequences of ``seq`` tokens (padded to a
multiple of ``2·sp``) and the element sizes of :class:`Precision`. Notation: ``L`` layers, ``h``
hidden, ``H``/``G`` query/kv heads, ``d`` head dim, ``f`` ffn hidden, ``V`` vocab, ``t`` tp,
``U`` ulysses, ``R`` ring, ``sp = U·R``, ``n = b·seq/sp`` tokens per rank (linear layers),
``T = seq/R`` tokens per ring rank (attention).

**Bytes** (what :func:`comm_stats.counting` measures in the benchmark; tests compare them):

* ``ulysses``/``ring``: ``L`` × :func:`traffic.mmsp_attention_bytes_per_rank` with ``H/t`` and
  ``G/t`` heads per tensor-parallel rank.
* ``tp`` (megatron-core tensor parallelism, activations ``X = n·h·e`` bytes): without Megatron's
  TP sequence parallelism, all-reduces of ``X`` — the embedding's output (forward), the attention
  and MLP outputs (forward, 2 per layer), the gradients of the QKV and FC1 inputs (backward, 2 per
  layer), the gradient of the output layer's input (backward) — plus three all-reduces of ``n``
  fp32 values in the vocab-parallel cross entropy. With TP sequence parallelism (GPU only; not
  measured on CPU) every all-reduce becomes an all-gather + reduce-scatter of the same volume,
  and the backward re-gathers each column-parallel input for its weight gradient (2 per layer and
  one for the output layer).
* ``dp`` (gradient reduction over the ``dp·sp`` ranks of :attr:`Strategy.grad_group`): all-reduce
  of the fp32 gradient buffer of the ``P_t`` parameters a rank holds (``none``); reduce-scatter
  of it and all-gather of the updated bf16/fp32 weights (``zero1``, Megatron's distributed
  optimizer); two all-gathers of the weights (forward, backward) and a reduce-scatter of the
  gradients (``zero3``).

**FLOPs** per rank: GEMMs ``3 · 2·n·(L·W_layer + h·V)/t`` (forward + twice for backward, ``W_layer
= h(H+2G)d + Hd·h + 3hf``); attention forward ``4·d·b·H/(tU)`` per attended (query, key) pair,
backward 2.5× that (flash attention recomputes the scores). Zigzag causal pairs per ring rank:
``T(T+1)/2`` on the diagonal block and ``T²/2`` for each of the ``R−1`` other blocks.

**Memory** per rank: see :func:`memory_per_rank`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from megatron_longvila.core.sequence_parallel import traffic
from megatron_longvila.core.topology import replicated_kv_heads
from megatron_longvila.models.config import MemoryConfig
from megatron_longvila.planning.workload import GPTShape, Strategy

SHARDINGS = ("none", "zero1", "zero3")
BACKWARD_ATTENTION_FLOPS = 2.5  # flash attention backward / forward (five matmuls vs two)


@dataclass(frozen=True)
class Precision:
    """Bytes per element: activations (q/k/v, hidden states), weights, reduced gradients, and the
    dK/dV accumulators that travel the backward ring (fp32 in MM-SP's ring)."""

    activation: int = 2
    weight: int = 2
    grad: int = 4
    ring_grad: int = 4

    @classmethod
    def of(cls, dtype: str) -> Precision:
        size = {"float32": 4, "bfloat16": 2, "float16": 2}[dtype]
        return cls(activation=size, weight=size)


@dataclass(frozen=True)
class Training:
    """How the step is run: weight/optimizer sharding (:data:`SHARDINGS`), full activation
    recomputation, Megatron's TP sequence parallelism, and whether the gradient reduction runs
    during the backward (Megatron's ``overlap_grad_reduce``, ZeRO's ``overlap_comm``)."""

    sharding: str = "none"
    recompute: bool = False
    tp_sequence_parallel: bool = False
    overlap_grad_sync: bool = False

    def __post_init__(self) -> None:
        if self.sharding not in SHARDINGS:
            raise ValueError(f"sharding {self.sharding!r}; expected one of {SHARDINGS}")


def tokens_per_rank(batch: int, seq: int, strategy: Strategy) -> int:
    """``n``: tokens each rank holds in the linear layers."""
    if seq % (2 * strategy.sp):
        raise ValueError(
            f"sequence {seq} is not a multiple of 2·sp = {2 * strategy.sp} ({strategy.label})"
        )
    return batch * seq // strategy.sp


def layer_linear_params(shape: GPTShape) -> int:
    """Weights of one layer's linear maps (QKV, output projection, SwiGLU FC1, FC2), unsharded."""
    h, d = shape.hidden, shape.head_dim
    qkv = h * (shape.heads + 2 * shape.kv_heads) * d
    return qkv + shape.heads * d * h + 3 * h * shape.ffn_hidden


def params_per_rank(shape: GPTShape, tp: int) -> int:
    """Parameters one tensor-parallel rank holds (norm weights replicated, the rest split)."""
    h = shape.hidden
    norms = (2 * shape.layers + 1) * h
    split = shape.layers * layer_linear_params(shape) + 2 * shape.vocab * h
    return norms + split // tp


# --------------------------------------------------------------------------------------------
# Bytes
# --------------------------------------------------------------------------------------------


def step_bytes_per_rank(
    shape: GPTShape,
    strategy: Strategy,
    batch: int,
    seq: int,
    precision: Precision,
    training: Training = Training(),
) -> dict[str, int]:
    """Bytes one rank sends in one training step: ``{"ulysses", "ring", "tp", "dp"}``."""
    t, e = strategy.tp, precision.activation
    attention = traffic.mmsp_attention_bytes_per_rank(
        batch=batch,
        seq_len=seq,
        heads=shape.heads // t,
        kv_heads=shape.kv_heads // t,
        head_dim=shape.head_dim,
        ulysses=strategy.ulysses,
        ring=strategy.ring,
        itemsize=e,
        grad_itemsize=precision.ring_grad,
    )
    return {
        "ulysses": shape.layers * sum(attention["ulysses"].values()),
        "ring": shape.layers * sum(attention["ring"].values()),
        "tp": _tensor_parallel_bytes(shape, strategy, batch, seq, e, training),
        "dp": _gradient_sync_bytes(shape, strategy, precision, training),
    }


def _tensor_parallel_bytes(
    shape: GPTShape, strategy: Strategy, batch: int, seq: int, e: int, training: Training
) -> int:
    t = strategy.tp
    n = tokens_per_rank(batch, seq, strategy)
    x = n * shape.hidden * e
    loss_stats = 3 * traffic.all_reduce_bytes(n * 4, t)
    if not training.tp_sequence_parallel:
        return (4 * shape.layers + 2) * traffic.all_reduce_bytes(x, t) + loss_stats
    # Per layer: 2 gathers + 2 scatters forward, their 4 transposes and 2 re-gathers backward;
    # embedding: scatter + its gather; output layer: gather, its scatter and a re-gather.
    # An all-gather of X/t sends as much as a reduce-scatter of X.
    collectives = 10 * shape.layers + 2 + 3
    return collectives * traffic.reduce_scatter_bytes(x, t) + loss_stats


def gradient_sync_collectives(
    shape: GPTShape, strategy: Strategy, precision: Precision, training: Training
) -> list[tuple[str, int]]:
    """The collectives of one gradient reduction over :attr:`Strategy.grad_group`, as
    ``(op, buffer bytes)`` with op one of ``all_reduce``/``reduce_scatter``/``all_gather`` and
    the buffer the full (unsharded) tensor of the rank's ``P_t`` parameters."""
    p = params_per_rank(shape, strategy.tp)
    grads, weights = p * precision.grad, p * precision.weight
    if training.sharding == "none":
        return [("all_reduce", grads)]
    gathers = 1 if training.sharding == "zero1" else 2
    return [("reduce_scatter", grads)] + [("all_gather", weights)] * gathers


def _gradient_sync_bytes(
    shape: GPTShape, strategy: Strategy, precision: Precision, training: Training
) -> int:
    n = strategy.grad_group
    sent = {
        "all_reduce": lambda size: traffic.all_reduce_bytes(size, n),
        "reduce_scatter": lambda size: traffic.reduce_scatter_bytes(size, n),
        "all_gather": lambda size: traffic.all_gather_bytes(size // n, n),
    }
    return sum(sent[op](size) for op, size in gradient_sync_collectives(
        shape, strategy, precision, training
    ))


# --------------------------------------------------------------------------------------------
# FLOPs
# --------------------------------------------------------------------------------------------


def ring_step_pairs(seq: int, strategy: Strategy, causal: bool = True) -> list[int]:
    """Attended (query, key) pairs per head of one ring rank at each ring step (zigzag)."""
    r = strategy.ring
    tokens = seq // r
    if not causal:
        return [tokens * tokens] * r
    return [tokens * (tokens + 1) // 2] + [tokens * tokens // 2] * (r - 1)


def attention_forward_flops_per_step(
    shape: GPTShape, strategy: Strategy, batch: int, seq: int, causal: bool = True
) -> list[int]:
    """Forward attention FLOPs of one rank and one layer at each ring step."""
    heads = shape.heads // (strategy.tp * strategy.ulysses)
    per_pair = 4 * shape.head_dim * batch * heads
    return [per_pair * pairs for pairs in ring_step_pairs(seq, strategy, causal)]


def gemm_flops_per_layer(shape: GPTShape, strategy: Strategy, batch: int, seq: int) -> int:
    """Forward GEMM FLOPs of one rank and one layer."""
    n = tokens_per_rank(batch, seq, strategy)
    return 2 * n * layer_linear_params(shape) // strategy.tp


def output_layer_flops(shape: GPTShape, strategy: Strategy, batch: int, seq: int) -> int:
    """Forward FLOPs of one rank's share of the output layer (the logits GEMM)."""
    n = tokens_per_rank(batch, seq, strategy)
    return 2 * n * shape.hidden * shape.vocab // strategy.tp


# --------------------------------------------------------------------------------------------
# Memory
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Kernels:
    """What the non-attention kernels keep for the backward, per token of a layer, with every
    memory option off (:meth:`keeping` applies a :class:`MemoryConfig`).

    ``norm_tensors``: ``h``-wide tensors per norm: its input (the residual stream) and what it
    keeps of its own (PyTorch's composite RMSNorm: the normalized input and the output, which the
    next linear keeps too); ``norm_stats``: fp32 values per token per norm (the reciprocal RMS);
    ``norms_recomputable``: whether megatron's selective "layernorm" recomputation applies (not
    where Transformer Engine fuses the norm into the next linear); ``mlp_tensors``: ``f``-wide
    tensors of the SwiGLU MLP (fc1's output counts two; megatron-core's unfused GLU also keeps
    the SiLU output, the linear half plus its offset, and their product); ``rope_tables``:
    ``d``-wide RoPE cos/sin rows kept per token (megatron-core's unfused RoPE, q and k).
    """

    norm_tensors: int
    norm_stats: int
    mlp_tensors: int
    rope_tables: int
    norms_recomputable: bool

    def keeping(self, memory: MemoryConfig) -> Kernels:
        """What is kept with ``memory``'s options: recomputed norms keep their input only,
        a recomputed activation leaves fc1's output (``2f``)."""
        norms = memory.norm_keeps_input and self.norms_recomputable
        return replace(
            self,
            norm_tensors=1 if norms else self.norm_tensors,
            norm_stats=0 if norms else self.norm_stats,
            mlp_tensors=min(self.mlp_tensors, 2)
            if memory.recompute_activation
            else self.mlp_tensors,
        )


# megatron-core's local spec on CPU (torch RMSNorm, unfused GLU and RoPE): measured on CPU,
# see benchmarks/layer_memory.py and tests/test_memory_model.py.
TORCH_KERNELS = Kernels(
    norm_tensors=3, norm_stats=1, mlp_tensors=5, rope_tables=4, norms_recomputable=True
)
# Transformer Engine layers with fused RMSNorm + linear, SwiGLU and RoPE (read from their
# source; not measured here): LayerNormLinear keeps its input and its normalized output. What
# megatron-core's GPTModel runs with the TE spec (the benchmark's model).
FUSED_KERNELS = Kernels(
    norm_tensors=2, norm_stats=1, mlp_tensors=3, rope_tables=0, norms_recomputable=False
)
# The LongVILA LLM on the TE spec: the same, but RoPE unfused (its angles are per token, from
# position ids; TE's fused RoPE takes one table for the whole batch), so each layer keeps its
# cos/sin tables.
LONGVILA_TE_KERNELS = replace(FUSED_KERNELS, rope_tables=4)
MODEL_MEMORY_OPTIONS = MemoryConfig()  # what LongVILAConfig.memory defaults to
NO_MEMORY_OPTIONS = MemoryConfig.keep_everything()


def layer_activation_bytes(
    shape: GPTShape,
    strategy: Strategy,
    batch: int,
    seq: int,
    precision: Precision,
    training: Training = Training(),
    kernels: Kernels = FUSED_KERNELS,
    memory: MemoryConfig = NO_MEMORY_OPTIONS,
) -> int:
    """Bytes one layer keeps for its backward on one rank (no layer recomputation).

    Per token, in the activation dtype: the two norms' tensors (``2·norm_tensors·h``, split over
    tp only with TP sequence parallelism) and their fp32 statistics, the MLP's
    (``mlp_tensors·f / t``), RoPE's tables, and the attention's, split over tp: one copy of q, k
    and v (``(H + 2G')d``, ``G'`` kv heads after Ulysses' replication: the rotated q and k and a
    copy of v, or the outputs of Ulysses' all-to-all), the attention output (``Hd``) and, where
    an all-to-all or a batch transpose stands between them, the output projection's input
    (another ``Hd``); plus the fp32 log-sum-exp (``H``). ``kernels.keeping(memory)`` says what
    the memory options remove.
    """
    kernels = kernels.keeping(memory)
    t, e = strategy.tp, precision.activation
    n = tokens_per_rank(batch, seq, strategy)
    h, d, f = shape.hidden, shape.head_dim, shape.ffn_hidden
    heads, kv = shape.heads // t, shape.kv_heads // t
    qkv = heads + 2 * replicated_kv_heads(kv, strategy.ulysses)
    outputs = 2 if strategy.ulysses > 1 or batch > 1 else 1
    norm_split = t if training.tp_sequence_parallel else 1
    norms = 2 * kernels.norm_tensors * h // norm_split
    width = (
        norms + kernels.mlp_tensors * f // t + kernels.rope_tables * d + (qkv + outputs * heads) * d
    )
    fp32 = 4 * (heads + 2 * kernels.norm_stats // norm_split)
    return n * (width * e + fp32)


def loss_peak_bytes(
    tokens: int,
    vocab_per_rank: int,
    hidden: int,
    precision: Precision,
    chunk: int | None,
    into_main_grad: bool = True,
) -> int:
    """Most bytes the output layer + cross entropy hold at once beyond their input and weights,
    for ``tokens`` tokens on a rank holding ``vocab_per_rank`` rows of the output layer.

    * megatron-core's cross entropy on all logits (``chunk`` None): the logits in the activation
      dtype beside their fp32 copy (two fp32 tensors in fp32), ``n·V·(4 + e)``; or, if more, the
      backward's fp32 logit gradient beside the input and weight gradients.
    * In chunks (:mod:`megatron_longvila.models.loss`): one chunk's fp32 logits (beside the GEMM
      output below fp32), the input gradient ``n·h·e`` and the weight gradient: megatron DDP's
      ``main_grad`` takes the chunks' sums (``into_main_grad``) and the backward returns a
      placeholder ``V·h·e``; without DDP an fp32 sum ``V·h·4``.
    """
    e = precision.activation
    n, v, h = tokens, vocab_per_rank, hidden
    if chunk is None:
        return max(n * v * (4 + e), n * v * 4 + n * h * e + v * h * e)
    logits = min(chunk, n) * v * (4 + (e if e < 4 else 0))
    return logits + n * h * e + v * h * (e if into_main_grad else 4)


def memory_per_rank(
    shape: GPTShape,
    strategy: Strategy,
    batch: int,
    seq: int,
    precision: Precision,
    training: Training = Training(),
    optimizer_bytes_per_param: int = 12,
    kernels: Kernels = LONGVILA_TE_KERNELS,
    memory: MemoryConfig = MODEL_MEMORY_OPTIONS,
) -> dict[str, int]:
    """Peak bytes per rank of one training step, by part.

    * ``weights``/``gradients``/``optimizer``: ``P_t`` parameters of the rank, gradients in
      ``precision.grad``, ``optimizer_bytes_per_param`` (fp32 master copy and two Adam moments;
      0 for a step without optimizer), sharded over the ``dp·sp`` ranks as ``training.sharding``
      says (``zero3`` also keeps two gathered layers);
    * ``activations``: ``L`` layers' saved tensors (:func:`layer_activation_bytes` with the
      ``memory`` options, by default the model's), or with full recomputation ``L`` layer inputs
      plus one layer recomputed;
    * ``logits``: the loss path's peak (:func:`loss_peak_bytes`: all logits, or one chunk's with
      ``memory.loss_chunk_tokens``);
    * ``transient``: working memory of the backward of one layer, taken as one more layer's saved
      tensors.
    """
    p = params_per_rank(shape, strategy.tp)
    n_shards = strategy.grad_group
    weights, grads = p * precision.weight, p * precision.grad
    optimizer = p * optimizer_bytes_per_param
    if training.sharding in ("zero1", "zero3"):
        optimizer //= n_shards
    if training.sharding == "zero3":
        gathered = 2 * layer_linear_params(shape) // strategy.tp * precision.weight
        weights, grads = weights // n_shards + gathered, grads // n_shards
    layer = layer_activation_bytes(
        shape, strategy, batch, seq, precision, training, kernels, memory
    )
    n = tokens_per_rank(batch, seq, strategy)
    if training.recompute:
        sp_split = strategy.tp if training.tp_sequence_parallel else 1
        activations = shape.layers * n * shape.hidden * precision.activation // sp_split + layer
    else:
        activations = shape.layers * layer
    vocab = shape.vocab // strategy.tp
    logits = loss_peak_bytes(n, vocab, shape.hidden, precision, memory.loss_chunk_tokens)
    parts = {
        "weights": weights,
        "gradients": grads,
        "optimizer": optimizer,
        "activations": activations,
        "logits": logits,
        "transient": layer,
    }
    parts["total"] = sum(parts.values())
    return parts
