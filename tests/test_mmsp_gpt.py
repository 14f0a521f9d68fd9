"""A megatron-core GPTModel with MMSPAttention (TP=2 × SP=2) equals the plain model (TP=1, SP=1).

Reference: the same GPTModel built from megatron-core's own local layer spec (its
``DotProductAttention``; packed samples expressed as its dense attention mask) on one
tensor/sequence-parallel rank, the whole sequence on every rank. Weights move between the layouts
through ``dist_checkpointing``. Under test: ``get_mmsp_gpt_layer_spec`` with TP=2 and SP=2 as
Ulysses (2×1) and as ring (1×2), sp in mcore's context-parallel slot (RoPE sliced by mcore), tokens
split zigzag, packed samples as ``MMSPPackedSeqParams`` segment ids, gradients reduced by mcore
DDP over dp×sp. Loss: sum of token losses over valid tokens, summed over ranks, divided by the
global count of valid tokens (``calculate_per_token_loss``).
Tolerance: 1e-5 absolute on the loss and on every parameter gradient (fp32).
"""

from __future__ import annotations

import tempfile

import pytest
import torch

TOLERANCE = 1e-5
BATCH, SEQ, VOCAB = 2, 32, 64
PACKED = (12, 9, 8)  # three samples in a row of 32 tokens, then 3 padding tokens


def _batches() -> dict[str, dict[str, torch.Tensor | None]]:
    """The same global batches on every rank: one plain, one packed with padding."""
    gen = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=gen)
    plain = {"tokens": tokens[:, :-1], "labels": tokens[:, 1:], "segments": None}
    segments = torch.cat([torch.full((n,), i) for i, n in enumerate(PACKED)])
    segments = torch.cat([segments, torch.full((SEQ - len(segments),), -1)]).expand(BATCH, SEQ)
    packed = {"tokens": tokens[:, :-1], "labels": tokens[:, 1:], "segments": segments.clone()}
    return {"plain": plain, "packed": packed}


def _dense_mask(segments: torch.Tensor | None) -> torch.Tensor | None:
    """megatron-core's mask convention ([b, 1, s, s], True = masked) for the reference model."""
    if segments is None:
        return None
    allowed = (segments[:, :, None] == segments[:, None, :]) & (segments[:, :, None] >= 0)
    allowed &= torch.ones(SEQ, SEQ, dtype=torch.bool).tril()
    return ~allowed[:, None]


def _full_gradient(param: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """The gradient of the unsharded parameter: tensor-parallel shards gathered on their dim."""
    from megatron.core import parallel_state

    tp_group = parallel_state.get_tensor_model_parallel_group()
    if not getattr(param, "tensor_model_parallel", False) or tp_group.size() == 1:
        return grad
    parts = [torch.empty_like(grad) for _ in range(tp_group.size())]
    torch.distributed.all_gather(parts, grad.contiguous(), group=tp_group)
    return torch.cat(parts, dim=param.partition_dim)


def run_gpt(tp: int, ulysses: int, ring: int, load_dir=None, save_dir=None):
    """Loss and full parameter gradients of each batch in this layout (MM-SP when sp > 1)."""
    import os

    from megatron.core import dist_checkpointing, parallel_state, tensor_parallel
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig

    from megatron_longvila.core import platform
    from megatron_longvila.core.parallel_state import MMSPTopology, initialize_mmsp
    from megatron_longvila.core.sequence_parallel.attention import (
        MMSPPackedSeqParams,
        get_mmsp_gpt_layer_spec,
    )
    from megatron_longvila.core.sequence_parallel.sharding import split_zigzag

    groups = initialize_mmsp(MMSPTopology(tp=tp, ulysses=ulysses, ring=ring))
    sp = groups.sp_size
    config = TransformerConfig(
        num_layers=2,
        hidden_size=32,
        num_attention_heads=4,
        num_query_groups=2,
        tensor_model_parallel_size=tp,
        context_parallel_size=sp,
        calculate_per_token_loss=True,
        init_method_std=0.2,  # sharp attention: masking or position errors show in the loss
        **platform.portable_transformer_options(),
    )
    platform.seed_everything(5)
    tensor_parallel.model_parallel_cuda_manual_seed(5)
    spec = get_mmsp_gpt_layer_spec() if sp > 1 else get_gpt_layer_local_spec()
    model = GPTModel(
        config=config,
        transformer_layer_spec=spec,
        vocab_size=VOCAB,
        max_sequence_length=SEQ,
        position_embedding_type="rope",
    )
    model = DistributedDataParallel(
        config=config,
        ddp_config=DistributedDataParallelConfig(grad_reduce_in_fp32=True, bucket_size=None),
        module=model,
    )
    if save_dir is not None:
        if torch.distributed.get_rank() == 0:
            os.makedirs(save_dir, exist_ok=True)
        torch.distributed.barrier()
        dist_checkpointing.save(model.module.sharded_state_dict(), save_dir)
    if load_dir is not None:
        state = dist_checkpointing.load(model.module.sharded_state_dict(), load_dir)
        model.module.load_state_dict(state)

    dp_sp_group = parallel_state.get_data_parallel_group(with_context_parallel=True)
    results = {}
    for kind, batch in _batches().items():
        model.zero_grad_buffer()
        segments = batch["segments"]
        valid = torch.ones(BATCH, SEQ) if segments is None else (segments >= 0).float()
        tokens, labels = batch["tokens"], batch["labels"]
        if sp > 1:
            tokens, labels, valid = (
                split_zigzag(t, sp, groups.sp_rank) for t in (tokens, labels, valid)
            )
            packed = None
            if segments is not None:
                local = split_zigzag(segments, sp, groups.sp_rank)
                packed = MMSPPackedSeqParams.from_segment_ids(local, SEQ)
            losses = model(tokens, None, None, labels=labels, packed_seq_params=packed)
        else:
            losses = model(tokens, None, _dense_mask(segments), labels=labels)
        token_sum = (losses * valid).sum()
        count = valid.sum()
        torch.distributed.all_reduce(count, group=dp_sp_group)
        (token_sum / count).backward()
        model.finish_grad_sync()
        loss = token_sum.detach().clone()
        torch.distributed.all_reduce(loss, group=dp_sp_group)
        grads = {
            name: _full_gradient(p, p.main_grad).clone()
            for name, p in model.module.named_parameters()
        }
        results[kind] = {"loss": float(loss / count), "grads": grads}
    return results


@pytest.fixture(scope="module")
def reference_and_init(rank_pools):
    init = tempfile.mkdtemp(prefix="mlv-mmsp-gpt-init-") + "/init"
    reference = rank_pools(8).run(run_gpt, 1, 1, 1, save_dir=init)
    return reference[0], init


@pytest.mark.parametrize("ulysses, ring", [(2, 1), (1, 2)], ids=["ulysses2", "ring2"])
def test_tp2_sp2_equals_tp1_sp1(rank_pools, reference_and_init, ulysses, ring):
    reference, init = reference_and_init
    parallel = rank_pools(8).run(run_gpt, 2, ulysses, ring, load_dir=init)
    for kind, ref in reference.items():
        assert ref["grads"], "the model has parameters"
        for rank, result in enumerate(parallel):
            got = result[kind]
            assert got["loss"] == pytest.approx(ref["loss"], abs=TOLERANCE), (kind, rank)
            assert set(got["grads"]) == set(ref["grads"])
            for name, grad in ref["grads"].items():
                error = (got["grads"][name] - grad).abs().max().item()
                assert error <= TOLERANCE, (kind, rank, name, error)
                assert grad.abs().max() > 0, (kind, name)  # a gradient that can be wrong
