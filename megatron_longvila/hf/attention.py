"""MM-SP as a transformers attention implementation.

transformers' attention modules (Llama, Qwen2 and the models built like them) compute q/k/v and
RoPE themselves and hand the core of attention to whatever ``config._attn_implementation`` names
in its ``AttentionInterface``. :func:`register_mmsp_attention` adds one that runs
:func:`~megatron_longvila.core.sequence_parallel.attention.mmsp_attention` over the sp group, so a
model whose inputs are this rank's sequence shard computes exact attention over the whole sequence.

Masks: a dense mask cannot be split over ranks, so the implementation takes none. The matching
entry in ``AttentionMaskInterface`` makes transformers skip building one (causality comes from
``module.is_causal``, packed samples from segment ids passed as ``mmsp_segment_ids``) and refuses
a 2D ``attention_mask`` that masks tokens out, instead of letting it be dropped unnoticed: express
padding as trailing padding with ignored labels, and packing as restarting position ids (see
:class:`~megatron_longvila.hf.sharding.MMSPSharding`). A ready-made 4D mask is refused too.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from megatron_longvila.core.parallel_state import MMSPGroups
from megatron_longvila.core.sequence_parallel.attention import mmsp_attention
from megatron_longvila.core.sequence_parallel.decode import decode_attention
from megatron_longvila.core.sequence_parallel.sharding import check_layout


def mmsp_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    *,
    groups: MMSPGroups,
    layout: str,
    dropout: float = 0.0,
    scaling: float | None = None,
    mmsp_segment_ids: torch.Tensor | None = None,
    mmsp_decode: bool = False,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function contract on this rank's shard.

    query: [b, hq, s/sp, d]; key/value: [b, hkv, s/sp, d] with ``hkv`` the model's kv heads
    (transformers' own modules pass them unrepeated) or already repeated to ``hq``; both work.
    mmsp_segment_ids: [b, s/sp] or None (-1 = padding). Returns ([b, s/sp, hq, d], None).
    mmsp_decode: one new token (query [b, hq, 1, d], the same on every rank) against this rank's
    cached keys/values [b, hkv, n, d] (an :class:`~megatron_longvila.hf.generation.MMSPCache`
    returns them); partial results are merged over the sp group.
    """
    if dropout:
        raise ValueError(
            f"MM-SP attention computes exact attention without dropout; got dropout={dropout} "
            "(set config.attention_dropout=0.0)"
        )
    for name in ("sliding_window", "softcap", "position_bias", "s_aux"):
        if kwargs.get(name) is not None:
            raise ValueError(f"MM-SP attention supports full attention only; got {name}")
    if attention_mask is not None:
        raise ValueError(
            f"MM-SP attention takes no dense attention mask (got shape "
            f"{tuple(attention_mask.shape)}): it cannot be split over sp ranks. Pass packed "
            "samples as restarting position ids to MMSPSharding.shard_batch"
        )
    causal = kwargs.get("is_causal")
    causal = getattr(module, "is_causal", True) if causal is None else causal
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))  # [b, s/sp, heads, d]
    if mmsp_decode:
        return decode_attention(q, k, v, groups, softmax_scale=scaling), None
    out = mmsp_attention(
        q,
        k,
        v,
        causal=causal,
        segment_ids=mmsp_segment_ids,
        softmax_scale=scaling,
        groups=groups,
        layout=layout,
    )
    return out, None


def no_dense_mask(*, attention_mask: torch.Tensor | None = None, **kwargs: Any) -> None:
    """transformers' mask-function contract: build nothing, refuse padding that would be lost."""
    if attention_mask is not None and not bool(attention_mask.all()):
        masked = int((~attention_mask.bool()).sum())
        raise ValueError(
            f"MM-SP attention cannot apply a padding attention_mask ({masked} of "
            f"{attention_mask.numel()} positions masked): pad at the end with ignored labels, or "
            "pack samples with restarting position ids (MMSPSharding.shard_batch)"
        )
    return None


def register_mmsp_attention(name: str, groups: MMSPGroups, layout: str = "zigzag") -> None:
    """Register attention and mask functions ``name`` in transformers (process-wide; a later
    registration of the same name replaces the groups and layout)."""
    check_layout(layout)
    AttentionInterface.register(
        name, functools.partial(mmsp_attention_forward, groups=groups, layout=layout)
    )
    AttentionMaskInterface.register(name, no_dense_mask)
