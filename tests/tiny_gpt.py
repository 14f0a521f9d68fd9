"""A megatron-core GPTModel trained for a few steps through mcore's own parallel machinery.

The smallest end-to-end check that megatron-core runs here for real: tensor and pipeline
parallel model, mcore ``DistributedDataParallel``, ``get_megatron_optimizer`` and the
``get_forward_backward_func`` pipeline schedule, on gloo + CPU or NCCL + GPU alike. Weights are
written with ``dist_checkpointing`` by one layout and loaded by another, so runs with different
TP/PP layouts start from the same model.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from megatron.core import dist_checkpointing, parallel_state, tensor_parallel
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.transformer import TransformerConfig

from megatron_longvila.core import platform


@dataclass
class TinyGPTSettings:
    num_layers: int = 4
    hidden_size: int = 64
    num_attention_heads: int = 4
    vocab_size: int = 128
    seq_length: int = 32
    micro_batch_size: int = 2
    num_microbatches: int = 2
    lr: float = 1e-3
    seed: int = 1234


def build_config(s: TinyGPTSettings) -> TransformerConfig:
    """A TransformerConfig that runs on CPU and GPU (fusions that need CUDA kernels are off)."""
    return TransformerConfig(
        num_layers=s.num_layers,
        hidden_size=s.hidden_size,
        num_attention_heads=s.num_attention_heads,
        tensor_model_parallel_size=parallel_state.get_tensor_model_parallel_world_size(),
        pipeline_model_parallel_size=parallel_state.get_pipeline_model_parallel_world_size(),
        pipeline_dtype=torch.float32,
        **{
            **platform.portable_transformer_options(),
            "persist_layer_norm": platform.cuda_available(),
        },
    )


def build_model(s: TinyGPTSettings) -> DistributedDataParallel:
    config = build_config(s)
    platform.seed_everything(s.seed)
    tensor_parallel.model_parallel_cuda_manual_seed(s.seed)
    model = GPTModel(
        config=config,
        transformer_layer_spec=get_gpt_layer_local_spec(),
        vocab_size=s.vocab_size,
        max_sequence_length=s.seq_length,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        position_embedding_type="rope",
    )
    model.to(platform.local_device())
    ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, bucket_size=None)
    return DistributedDataParallel(config=config, ddp_config=ddp_config, module=model)


def synthetic_batches(s: TinyGPTSettings, steps: int) -> list[list[dict[str, torch.Tensor]]]:
    """The same token batches on every rank: a learnable pattern (next token = token + 1)."""
    gen = torch.Generator().manual_seed(s.seed + 1)
    batches = []
    for _ in range(steps):
        micro = []
        for _ in range(s.num_microbatches):
            start = torch.randint(0, s.vocab_size, (s.micro_batch_size, 1), generator=gen)
            tokens = (start + torch.arange(s.seq_length + 1)) % s.vocab_size
            micro.append({"tokens": tokens[:, :-1], "labels": tokens[:, 1:]})
        batches.append(micro)
    return batches


def _loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    losses = output_tensor.float().view(-1)
    mask = loss_mask.view(-1).float()
    total = torch.sum(losses * mask)
    count = mask.sum().to(torch.int)
    return total, count, {"lm loss": torch.stack([total.detach(), mask.sum()])}


def _forward_step(data_iterator, model):
    batch = next(data_iterator)
    device = platform.local_device()
    tokens = batch["tokens"].to(device)
    labels = batch["labels"].to(device)
    positions = torch.arange(tokens.shape[1], device=device).unsqueeze(0).expand_as(tokens)
    output = model(tokens, positions, attention_mask=None, labels=labels)
    return output, partial(_loss_func, torch.ones_like(labels))


def train(
    s: TinyGPTSettings,
    steps: int,
    load_dir: str | None = None,
    save_dir: str | None = None,
    progress: Any = None,
) -> list[float]:
    """Train ``steps`` steps in the current parallel layout; return the loss of each step.

    ``save_dir`` receives the initial weights (before any step) as a dist checkpoint;
    ``load_dir`` replaces the initial weights with such a checkpoint, whatever layout wrote it.
    Every rank returns the same losses (broadcast from the last pipeline stage).
    """
    model = build_model(s)
    if save_dir is not None:
        if torch.distributed.get_rank() == 0:
            os.makedirs(save_dir, exist_ok=True)
        torch.distributed.barrier()
        dist_checkpointing.save(model.module.sharded_state_dict(), save_dir)
    if load_dir is not None:
        state = dist_checkpointing.load(model.module.sharded_state_dict(), load_dir)
        model.module.load_state_dict(state)

    optimizer = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=s.lr, weight_decay=0.0, clip_grad=1.0), [model]
    )
    return train_steps(model, optimizer, s, steps, progress=progress)


def train_steps(
    model: DistributedDataParallel, optimizer: Any, s: TinyGPTSettings, steps: int, progress=None
) -> list[float]:
    """Run ``steps`` optimizer steps on the synthetic batches; return each step's loss."""
    forward_backward = get_forward_backward_func()
    losses = []
    for step_batches in synthetic_batches(s, steps):
        model.zero_grad_buffer()
        optimizer.zero_grad()
        reduced = forward_backward(
            forward_step_func=_forward_step,
            data_iterator=iter(step_batches),
            model=[model],
            num_microbatches=s.num_microbatches,
            seq_length=s.seq_length,
            micro_batch_size=s.micro_batch_size,
            forward_only=False,
        )
        optimizer.step()
        losses.append(_step_loss(reduced))
        if progress is not None:
            progress(len(losses), losses[-1])
    return losses


def _step_loss(reduced: list[dict[str, torch.Tensor]]) -> float:
    """Mean token loss of the step, known on every rank."""
    value = torch.zeros(2, dtype=torch.float64)
    if parallel_state.is_pipeline_last_stage():
        for item in reduced:
            value += item["lm loss"].double()
    torch.distributed.all_reduce(value, group=parallel_state.get_pipeline_model_parallel_group())
    # Data-parallel replicas saw the same tokens here, so their sums are equal: average them.
    torch.distributed.all_reduce(value, group=parallel_state.get_data_parallel_group())
    return float(value[0] / value[1])
