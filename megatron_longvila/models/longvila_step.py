"""LongVILA under megatron-core's own training machinery: model chunks, forward step, loss.

* :func:`build_longvila_model` returns this rank's model chunk(s) for the current megatron-core
  layout (``initialize_mmsp`` first): vision tower + projector on the first pipeline stage, the
  LLM layers of this stage, wrapped in megatron's DDP when a ``ddp_config`` is given (then
  ``config.finalize_model_grads_func`` is set, so the schedules finish gradients the megatron
  way).
* :func:`forward_step` is the ``forward_step_func`` of ``get_forward_backward_func()`` (no
  pipelining or 1F1B): it takes a :class:`MultimodalBatch` from the iterator — every rank of a
  data-parallel replica, on every pipeline stage, must get the same batches — builds this rank's
  inputs and runs the model; on the last stage its loss function returns what megatron's
  per-token loss path expects.

Loss normalization (``calculate_per_token_loss=True``): each rank returns the *sum* of its
shard's token losses and its count of valid tokens; megatron backpropagates the sum, DDP sums
gradients over dp × sp, and ``finalize_model_grads`` divides them by the count summed over the
micro-batches and all dp × sp ranks. The gradient is thus that of
``sum of all token losses / global count of valid tokens``, for any sp, dp and micro-batching.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from functools import partial
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.distributed.finalize_model_grads import finalize_model_grads
from megatron.core.utils import get_attr_wrapped_model

from megatron_longvila.core import platform
from megatron_longvila.core.parallel_state import group_size
from megatron_longvila.core.sequence_parallel import comm_stats
from megatron_longvila.data.batch import MultimodalBatch
from megatron_longvila.models.config import LongVILAConfig
from megatron_longvila.models.longvila import LongVILAModel


def build_longvila_model(
    cfg: LongVILAConfig,
    *,
    ddp_config: DistributedDataParallelConfig | None = None,
    params_dtype: torch.dtype = torch.float32,
    transformer_overrides: dict[str, Any] | None = None,
    seed: int = 1234,
    frozen: Sequence[str] = (),
) -> list[torch.nn.Module]:
    """This rank's model chunks (one: virtual pipeline stages are not used), on its device.

    On the CPU, weights are drawn on the host from ``seed``, the same on every rank
    (tensor-parallel ranks slice the same full tensors), so all sp and dp ranks start alike; on
    GPUs each rank draws its own shards on the device with megatron's model-parallel RNG
    (:func:`platform.weight_init_options`). A stage draws only its own
    layers, so layouts with different pipeline sizes start from different weights: load a
    checkpoint (``dist_checkpointing``) to start them from the same. With ``ddp_config`` the
    chunk is megatron's ``DistributedDataParallel`` (gradients in ``param.main_grad``, finished
    by the schedules through ``finalize_model_grads``; ``average_in_collective`` must stay off,
    as megatron requires with per-token losses); without, a bare :class:`LongVILAModel` (e.g.
    for evaluation with ``forward_only=True``). ``frozen`` names submodules (``vision_tower``,
    ``mm_projector``, ``llm``) whose parameters do not train; they are marked before DDP builds
    its gradient buffers, so no buffer or optimizer state is made for them.
    """
    platform.seed_everything(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    overrides = dict(transformer_overrides or {})
    if ddp_config is not None and platform.layer_spec_backend() == "te":
        # Weight gradients go straight into DDP's fp32 main_grad buffers inside the GEMM.
        fusion = platform.gradient_accumulation_fusion_available()
        overrides.setdefault("gradient_accumulation_fusion", fusion)
    model = LongVILAModel(
        cfg,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        params_dtype=params_dtype,
        transformer_overrides=overrides,
    )
    model.to(platform.local_device())
    for name in frozen:
        module = getattr(model, name, None)  # absent on later pipeline stages
        if module is not None:
            module.requires_grad_(False)
    if ddp_config is None:
        return [model]
    # The schedules then finish gradients as megatron does: DDP reduction, token-count scaling.
    model.config.finalize_model_grads_func = finalize_model_grads
    return [DistributedDataParallel(config=model.config, ddp_config=ddp_config, module=model)]


def longvila_loss(
    labels: torch.Tensor, sp_group: dist.ProcessGroup | None, losses: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Megatron's per-token loss triple for one micro-batch on this rank.

    labels, losses: [b, s/sp] (losses 0 where the label is IGNORE_INDEX).
    Returns (sum of this shard's token losses, its count of valid tokens as int, {"lm loss":
    [sum, count] over the whole sp group}); the logged pair divides to the micro-batch's mean
    token loss, and summing it over data-parallel replicas gives the global batch's.
    """
    valid = labels >= 0
    total = losses.float().masked_fill(~valid, 0.0).sum()
    count = valid.sum()
    report = torch.stack([total.detach(), count.to(total.dtype)])
    if group_size(sp_group) > 1:
        comm_stats.all_reduce_sum(report, sp_group, "sp")
    return total, count.to(torch.int), {"lm loss": report}


def forward_step(
    data_iterator: Iterator[MultimodalBatch], model: torch.nn.Module
) -> tuple[torch.Tensor, Any]:
    """``forward_step_func`` for megatron's ``get_forward_backward_func()`` schedules.

    Returns (per-token losses [b, s/sp] on the last stage or hidden states for the next stage,
    the loss function :func:`longvila_loss` bound to this micro-batch's labels).
    """
    batch = next(data_iterator)
    longvila = get_attr_wrapped_model(model, "prepare_inputs", return_model_obj=True)
    inputs = longvila.prepare_inputs(batch).to(platform.local_device())
    output = model(inputs)
    return output, partial(longvila_loss, inputs.labels, longvila.groups.sp)
