"""One LongVILA training micro-step in a tp × ulysses × ring × pp layout, on every rank of a pool:
the loss and the full (unsharded, globally named) gradients, for the model tests to compare with
a reference. Weights come from a dist checkpoint, so every layout starts from the same model."""

from __future__ import annotations

import torch
from longvila_batches import CFG, micro_batches

from megatron_longvila.models.config import LongVILAConfig

# Sharp attention (as in the MM-SP GPT test): a masking or position error shows in the loss.
OVERRIDES = {"init_method_std": 0.2}


def _full_gradient(param: torch.Tensor, grad: torch.Tensor, name: str) -> torch.Tensor:
    """The unsharded gradient: tensor-parallel shards concatenated on their partition dim (for
    SwiGLU's fused [gate; up] the gate parts first, then the up parts, as at TP = 1)."""
    from megatron.core import parallel_state

    group = parallel_state.get_tensor_model_parallel_group()
    if not getattr(param, "tensor_model_parallel", False) or group.size() == 1:
        return grad
    parts = [torch.empty_like(grad) for _ in range(group.size())]
    torch.distributed.all_gather(parts, grad.contiguous(), group=group)
    if name.startswith("llm.") and name.endswith("mlp.linear_fc1.weight"):
        halves = [p.chunk(2, dim=0) for p in parts]
        parts = [h[0] for h in halves] + [h[1] for h in halves]
    return torch.cat(parts, dim=param.partition_dim)


def _global_name(name: str, layer_offset: int) -> str:
    """``llm.decoder.layers.<local>.`` → ``llm.decoder.layers.<global>.`` on later stages."""
    prefix = "llm.decoder.layers."
    if not name.startswith(prefix):
        return name
    local, rest = name[len(prefix) :].split(".", 1)
    return f"{prefix}{int(local) + layer_offset}.{rest}"


def run_layout(
    tp: int,
    ulysses: int,
    ring: int,
    pp: int,
    checkpoint: str,
    cfg: LongVILAConfig = CFG,
    overrides: dict | None = None,
) -> dict:
    """Loss, full gradients, frames encoded and exchange bytes of this rank in one layout, for
    the model ``cfg`` with megatron ``overrides`` (default :data:`OVERRIDES`), weights loaded
    from the dist checkpoint ``checkpoint``; the batches of :func:`micro_batches`."""
    from megatron.core import dist_checkpointing, parallel_state
    from megatron.core.distributed import DistributedDataParallelConfig
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_longvila.core.parallel_state import MMSPTopology, initialize_mmsp
    from megatron_longvila.core.sequence_parallel import comm_stats
    from megatron_longvila.models.longvila_step import build_longvila_model, forward_step

    groups = initialize_mmsp(MMSPTopology(tp=tp, ulysses=ulysses, ring=ring, pp=pp))
    ddp = DistributedDataParallelConfig(grad_reduce_in_fp32=True, bucket_size=None)
    overrides = OVERRIDES if overrides is None else overrides
    (model,) = build_longvila_model(cfg, ddp_config=ddp, transformer_overrides=overrides)
    core = model.module
    core.load_state_dict(dist_checkpointing.load(core.sharded_state_dict(), checkpoint))

    encoded: list[int] = []
    if core.pre_process:
        core.vision_tower.register_forward_pre_hook(lambda _, args: encoded.append(len(args[0])))
    dp_rank = parallel_state.get_data_parallel_rank()
    dp_size = parallel_state.get_data_parallel_world_size()
    mine = micro_batches()[dp_rank::dp_size]
    model.zero_grad_buffer()
    with comm_stats.counting() as sent:
        reduced = get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iter(mine),
            model=[model],
            num_microbatches=len(mine),
            seq_length=0,  # variable: the stages exchange shapes
            micro_batch_size=mine[0].batch_size,
        )
    loss = None
    if parallel_state.is_pipeline_last_stage():
        report = sum(item["lm loss"] for item in reduced)
        torch.distributed.all_reduce(report, group=parallel_state.get_data_parallel_group())
        loss = float(report[0] / report[1])
    offset = core.llm.decoder.layers[0].layer_number - 1
    grads = {
        _global_name(name, offset): _full_gradient(p, p.main_grad, name).clone()
        for name, p in core.named_parameters()
        if p.requires_grad
    }
    return {
        "loss": loss,
        "grads": grads,
        "sp_rank": groups.sp_rank,
        "dp_rank": dp_rank,
        "first_stage": core.pre_process,
        "encoded": encoded,
        "exchange_bytes": sent.bytes("sp", "all_to_all_v"),
        "sequence_parallel": core.config.sequence_parallel,
    }
