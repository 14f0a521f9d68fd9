"""One training step of a megatron-core GPT decoder under a parallel strategy, measured.

Every rank of ``strategy.world`` runs :func:`measure_strategy`: it builds megatron-core's
``GPTModel`` for the shape (Llama-like: RMSNorm, GQA, RoPE, SwiGLU, untied embeddings) in the
strategy's topology, wraps it in mcore ``DistributedDataParallel``, feeds each rank its zigzag
shard of one synthetic sequence and measures a full step — forward, loss, backward and the
gradient reduction over the sequence-parallel (dp × cp) ranks; the optimizer step is left out:

* step time: median over repeats (warm-up dropped) of the slowest rank's time;
* bytes each rank sends, by group: ``ulysses`` and ``ring`` (MM-SP's own transfers), ``tp``
  (megatron-core's tensor-parallel collectives) and ``dp`` (gradient reduction), from
  :func:`comm_stats.counting`;
* peak memory per rank: parameters and gradient buffers plus the peak of what the step allocates;
* forward attention FLOPs of every rank (load balance = max / mean).

The attention is MM-SP's ``MMSPAttention`` for every strategy: ``ulysses × ring`` splits for 2D,
ring-only and Ulysses-only, and ``ulysses = 1`` beside megatron-core tensor parallelism for CP+TP.
On a CUDA machine with Transformer Engine, layers use TE's modules, and CP+TP uses TE's own
context-parallel attention with ``cp_comm_type="p2p"`` (and Megatron's TP sequence parallelism).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from megatron_longvila.core import platform
from megatron_longvila.core.memory_tracking import TensorMemoryMeter
from megatron_longvila.planning.cost_model import FUSED_KERNELS, TORCH_KERNELS, Kernels
from megatron_longvila.planning.workload import GPTShape, Strategy


@dataclass(frozen=True)
class StepSettings:
    """One sequence of ``seq`` tokens (``batch`` of them), timed over ``repeats`` steps."""

    batch: int = 1
    seq: int = 4096
    dtype: str = "float32"
    repeats: int = 5
    warmup: int = 1
    seed: int = 0


def kernels_in_use() -> Kernels:
    """What the layers built here keep for the backward (see :class:`cost_model.Kernels`)."""
    return FUSED_KERNELS if platform.transformer_engine_available() else TORCH_KERNELS


def uses_te_context_parallel(strategy: Strategy) -> bool:
    """Whether CP+TP runs Transformer Engine's own p2p context-parallel attention here."""
    return strategy.kind == "CP+TP" and platform.transformer_engine_available()


def _layer_spec(strategy: Strategy):
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from megatron_longvila.core.sequence_parallel.attention import with_mmsp_core_attention

    if platform.transformer_engine_available():
        from megatron.core.models.gpt.gpt_layer_specs import (
            get_gpt_layer_with_transformer_engine_spec,
        )

        spec = get_gpt_layer_with_transformer_engine_spec()
        return spec if uses_te_context_parallel(strategy) else with_mmsp_core_attention(spec)
    return with_mmsp_core_attention(get_gpt_layer_local_spec(normalization="RMSNorm"))


def build_gpt(shape: GPTShape, strategy: Strategy, settings: StepSettings):
    """megatron-core GPTModel in DDP for ``strategy`` (MM-SP groups already initialized)."""
    import torch.nn.functional as F
    from megatron.core import tensor_parallel
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.models.gpt import GPTModel
    from megatron.core.transformer import TransformerConfig

    dtype = getattr(torch, settings.dtype)
    te_cp = uses_te_context_parallel(strategy)
    # Fused SwiGLU and RoPE on GPUs (FUSED_KERNELS); CPU runs unfused.
    fused = platform.transformer_engine_available()
    config = TransformerConfig(
        num_layers=shape.layers,
        hidden_size=shape.hidden,
        num_attention_heads=shape.heads,
        num_query_groups=shape.kv_heads,
        ffn_hidden_size=shape.ffn_hidden,
        normalization="RMSNorm",
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        tensor_model_parallel_size=strategy.tp,
        context_parallel_size=strategy.sp,
        cp_comm_type="p2p" if te_cp else None,
        sequence_parallel=te_cp and strategy.tp > 1,
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        calculate_per_token_loss=True,  # the loss below is already a global mean: sum gradients
        **{
            **platform.portable_transformer_options(),
            "bias_activation_fusion": fused,
            "apply_rope_fusion": fused,
        },
    )
    platform.seed_everything(settings.seed)
    tensor_parallel.model_parallel_cuda_manual_seed(settings.seed)
    model = GPTModel(
        config=config,
        transformer_layer_spec=_layer_spec(strategy),
        vocab_size=shape.vocab,
        max_sequence_length=settings.seq,
        position_embedding_type="rope",
        share_embeddings_and_output_weights=False,
    )
    model.to(platform.local_device())
    ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, bucket_size=None)
    return DistributedDataParallel(config=config, ddp_config=ddp_config, module=model)


def local_batch(
    shape: GPTShape, settings: StepSettings, sp: int, sp_rank: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's zigzag shard ``[b, seq/sp]`` of the same random tokens and labels everywhere."""
    from megatron_longvila.core.sequence_parallel.sharding import split_zigzag

    gen = torch.Generator().manual_seed(settings.seed + 1)
    tokens = torch.randint(0, shape.vocab, (settings.batch, settings.seq + 1), generator=gen)
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    return tuple(split_zigzag(t, sp, sp_rank).to(device) for t in (inputs, labels))


def train_step(model, tokens: torch.Tensor, labels: torch.Tensor, total_tokens: int):
    """Forward, mean token loss over the whole sequence, backward, gradient reduction."""
    model.zero_grad_buffer()
    losses = model(tokens, None, None, labels=labels)
    loss = losses.float().sum() / total_tokens
    loss.backward()
    model.finish_grad_sync()
    return loss.detach()


def _static_bytes(model) -> int:
    """Parameters and their gradient buffers (both exist before and after every step)."""
    total = 0
    for p in model.module.parameters():
        total += p.numel() * p.element_size()
        if getattr(p, "main_grad", None) is not None:
            total += p.main_grad.numel() * p.main_grad.element_size()
    return total


def _timed(step, device: torch.device) -> float:
    """Seconds of one step on the slowest rank."""
    dist.barrier()
    start = time.perf_counter()
    step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = torch.tensor([time.perf_counter() - start], dtype=torch.float64, device=device)
    dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
    return float(elapsed)


def measure_strategy(
    shape: GPTShape, strategy: Strategy, settings: StepSettings, detailed: bool = True
) -> dict:
    """On every rank of ``strategy.world``: build and time one strategy; with ``detailed`` also
    count bytes and FLOPs and track memory (in an extra step before the timed ones)."""
    from megatron.core import parallel_state as mcore

    from megatron_longvila.core import platform
    from megatron_longvila.core.parallel_state import MMSPTopology, initialize_mmsp

    if dist.get_world_size() != strategy.world:
        raise ValueError(
            f"{strategy.label} needs {strategy.world} ranks, the job has {dist.get_world_size()}"
        )
    strategy.check(shape)
    topology = MMSPTopology(tp=strategy.tp, ulysses=strategy.ulysses, ring=strategy.ring)
    groups = initialize_mmsp(topology)
    try:
        device = platform.local_device()
        model = build_gpt(shape, strategy, settings)
        tokens, labels = local_batch(shape, settings, groups.sp_size, groups.sp_rank, device)

        def step():
            return train_step(model, tokens, labels, settings.batch * settings.seq)

        row = {
            "strategy": strategy.label,
            "kind": strategy.kind,
            "tp": strategy.tp,
            "ulysses": strategy.ulysses,
            "ring": strategy.ring,
            "te_context_parallel": uses_te_context_parallel(strategy),
        }
        if detailed:
            row |= _detailed_measurements(model, step, strategy, device)
        times = [_timed(step, device) for _ in range(settings.warmup + settings.repeats)]
        row["times_s"] = times[settings.warmup :]
        return row
    finally:
        mcore.destroy_model_parallel()


def _detailed_measurements(model, step, strategy: Strategy, device: torch.device) -> dict:
    """Loss, bytes by group, attention FLOPs of every rank and peak memory of one step."""
    from megatron.core import parallel_state as mcore

    from megatron_longvila.core.sequence_parallel import comm_stats, kernels

    foreign = {
        "tp": mcore.get_tensor_model_parallel_group() if strategy.tp > 1 else None,
        "dp": mcore.get_data_parallel_group(with_context_parallel=True),
    }
    if uses_te_context_parallel(strategy):  # TE's ring is not ours: count it at the dispatcher
        foreign["ring"] = mcore.get_context_parallel_group()
    with comm_stats.counting(foreign) as sent, kernels.counting_flops() as flops:
        loss = step()
    with TensorMemoryMeter(device) as meter:
        step()
    peak = meter.peak
    per_rank_flops = [None] * strategy.world
    dist.all_gather_object(per_rank_flops, flops.forward)
    memory = torch.tensor([_static_bytes(model) + peak, peak], dtype=torch.float64, device=device)
    dist.all_reduce(memory, op=dist.ReduceOp.MAX)
    dist.all_reduce(loss, group=mcore.get_context_parallel_group())
    return {
        "loss": float(loss),
        "bytes_by_group": {g: sent.bytes(g) for g in ("ulysses", "ring", "tp", "dp")},
        "bytes_by_op": sent.as_dict(),
        "peak_bytes": int(memory[0]),
        "step_peak_bytes": int(memory[1]),
        "attention_forward_flops": per_rank_flops,
        "load_balance": max_over_mean(per_rank_flops),
    }


def max_over_mean(values: list[Any]) -> float | None:
    """Load balance of per-rank work; None when some rank's work was not counted."""
    if not values or any(v in (None, 0) for v in values):
        return None  # not counted (TE's attention) or no attention at all
    return max(values) / (sum(values) / len(values))
