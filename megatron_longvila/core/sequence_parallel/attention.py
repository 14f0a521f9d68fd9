"""MM-SP attention entry points: a function on local shards and a megatron-core module.

* :func:`mmsp_attention` — exact attention of this rank's shard ``[b, s/sp, heads, d]`` over the
  whole sequence, by 2D (Ulysses × ring) sequence parallelism.
* :class:`MMSPAttention` — the same as a megatron-core ``core_attention`` module, so a GPT layer
  spec gets MM-SP by swapping one submodule (:func:`get_mmsp_gpt_layer_spec`). sp sits in mcore's
  context-parallel slot; the module reads its groups from the ``pg_collection`` mcore hands it
  (``cp`` = sp, ``hcp`` = [ulysses, ring]).

Packed sequences reach the module through the ``packed_seq_params`` argument that megatron-core
already threads from ``GPTModel.forward`` down to ``core_attention``: pass an
:class:`MMSPPackedSeqParams` carrying this rank's segment ids. Its ``max_seqlen_q/kv`` are the
global (padded) sequence length, which is what mcore's RoPE then covers before it slices the
zigzag part of this rank; RoPE depends only on relative positions within a segment, so global
positions give the same attention as positions restarting per sample.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_longvila.core.parallel_state import MMSPGroups, get_mmsp_groups
from megatron_longvila.core.sequence_parallel.hybrid import hybrid_attention
from megatron_longvila.core.sequence_parallel.sharding import check_layout
from megatron_longvila.core.topology import replicated_kv_heads


def mmsp_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = True,
    segment_ids: torch.Tensor | None = None,
    softmax_scale: float | None = None,
    groups: MMSPGroups | None = None,
    layout: str = "zigzag",
) -> torch.Tensor:
    """Exact attention of this rank's tokens over the full sequence held by its sp group.

    q: [b, s/sp, hq, d]; k, v: [b, s/sp, hkv, d] (``hkv`` divides ``hq``); this rank's shard of
    the padded sequence in ``layout`` ("zigzag" or "contiguous", see :mod:`.sharding`).
    segment_ids: [b, s/sp] int, or None: tokens attend only within their segment (across shard
    boundaries too); segment ``-1`` is padding and attends to nothing (its output is 0).
    groups: the MM-SP groups (default: those of :func:`get_mmsp_groups`, or none at all).
    Returns [b, s/sp, hq, d].
    """
    check_layout(layout)
    groups = get_mmsp_groups() if groups is None else groups
    _check_shapes(q, k, v, segment_ids, groups.ulysses_size, layout)
    scale = 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else softmax_scale
    return hybrid_attention(
        q, k, v, groups, causal=causal, layout=layout, scale=scale, segment_ids=segment_ids
    )


def _check_shapes(q, k, v, segment_ids, ulysses: int, layout: str) -> None:
    if q.dim() != 4 or k.shape != v.shape or k.dim() != 4:
        raise ValueError(
            f"expected q [b, s, hq, d] and k, v [b, s, hkv, d]; got {tuple(q.shape)}, "
            f"{tuple(k.shape)}, {tuple(v.shape)}"
        )
    if q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        raise ValueError(
            f"q {tuple(q.shape)} and k/v {tuple(k.shape)} differ in batch, sequence or head dim"
        )
    heads, kv_heads = q.shape[2], k.shape[2]
    if heads % kv_heads:
        raise ValueError(f"{heads} query heads are not a multiple of {kv_heads} kv heads")
    if heads % ulysses:
        raise ValueError(f"{heads} query heads cannot be split over ulysses={ulysses} ranks")
    replicated_kv_heads(kv_heads, ulysses)  # raises if neither divides the other
    if layout == "zigzag" and q.shape[1] % 2:
        raise ValueError(
            f"a zigzag shard holds two equal chunks, got {q.shape[1]} tokens; pad the global "
            "sequence to a multiple of 2·sp"
        )
    if segment_ids is not None and tuple(segment_ids.shape) != tuple(q.shape[:2]):
        raise ValueError(
            f"segment_ids {tuple(segment_ids.shape)} must be [b, s] = {tuple(q.shape[:2])}"
        )


@dataclasses.dataclass
class MMSPPackedSeqParams(PackedSeqParams):
    """megatron-core's ``PackedSeqParams`` carrying MM-SP segment ids (``sbhd`` tensors).

    segment_ids: [b, s/sp] this rank's (zigzag) shard of the segment ids, -1 at padding.
    max_seqlen_q/kv: the global padded sequence length (mcore sizes RoPE from it).
    """

    segment_ids: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.qkv_format is None:
            self.qkv_format = "sbhd"
        if self.qkv_format != "sbhd":
            raise ValueError(f"MMSPPackedSeqParams carries sbhd tensors, not {self.qkv_format}")

    @classmethod
    def from_segment_ids(cls, segment_ids: torch.Tensor, seq_length: int) -> MMSPPackedSeqParams:
        """``segment_ids``: this rank's shard ``[b, s/sp]``; ``seq_length``: global padded ``s``."""
        return cls(segment_ids=segment_ids, max_seqlen_q=seq_length, max_seqlen_kv=seq_length)

    def attention(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        layer_number: int,
        causal: bool,
        softmax_scale: float,
        groups: MMSPGroups,
    ) -> torch.Tensor:
        """What :class:`MMSPAttention` computes for these parameters: q [b, s/sp, hq, d],
        k/v [b, s/sp, hkv, d] → [b, s/sp, hq, d]. Here :func:`mmsp_attention` over this rank's
        zigzag shard with the segment ids; KV-cached inference overrides it
        (:class:`~.decode.MMSPKVCacheParams`). ``layer_number``: the calling layer (1-based)."""
        return mmsp_attention(
            q,
            k,
            v,
            causal=causal,
            segment_ids=self.segment_ids,
            softmax_scale=softmax_scale,
            groups=groups,
            layout="zigzag",
        )


_UNPACKED = MMSPPackedSeqParams()  # rows of one sample: plain causal (or full) attention


# Padding is carried by segment ids (-1), so the padding mask types reduce to causal or not.
_CAUSAL_BY_MASK_TYPE = {
    AttnMaskType.causal: True,
    AttnMaskType.padding_causal: True,
    AttnMaskType.no_mask: False,
    AttnMaskType.padding: False,
}


class MMSPAttention(MegatronModule):
    """megatron-core ``core_attention`` running exact 2D sequence-parallel attention.

    Same constructor and forward signature as mcore's ``DotProductAttention``: query/key/value
    ``[s/sp, b, heads, d]`` (this rank's zigzag shard, as mcore's CP layout and RoPE expect) →
    ``[s/sp, b, heads·d]``. Causal or not follows ``attn_mask_type``; packed sequences come as
    :class:`MMSPPackedSeqParams`, whose :meth:`~MMSPPackedSeqParams.attention` computes the
    result (so KV-cached inference enters the same way, :class:`~.decode.MMSPKVCacheParams`).
    Dense ``attention_mask`` tensors cannot be split over ranks and are refused; express padding
    and packing as segment ids instead.
    """

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        cp_comm_type: str | None = None,  # mcore's CP variants; MM-SP has its own, unused
        pg_collection: Any = None,
    ) -> None:
        super().__init__(config=config)
        dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        if dropout:
            raise ValueError(
                f"MMSPAttention computes exact attention without dropout; set "
                f"attention_dropout=0.0 (got {dropout})"
            )
        if config.softmax_type != "vanilla" or config.window_size is not None:
            raise ValueError(
                f"MMSPAttention supports vanilla full attention only (softmax_type="
                f"{config.softmax_type!r}, window_size={config.window_size})"
            )
        self.layer_number = layer_number
        self.attn_mask_type = attn_mask_type
        self.attention_type = attention_type
        # mcore's apply_query_key_layer_scaling divides the scale by the layer number and
        # multiplies it back inside its fp32 softmax: the net scale is 1/sqrt(d) either way.
        head_dim = config.kv_channels
        self.softmax_scale = 1.0 / math.sqrt(head_dim) if softmax_scale is None else softmax_scale
        if pg_collection is not None:
            self.groups = MMSPGroups.from_pg_collection(pg_collection)
        else:
            self.groups = get_mmsp_groups()
        if self.groups.sp_size != config.context_parallel_size:
            raise ValueError(
                f"config.context_parallel_size {config.context_parallel_size} must equal the MM-SP "
                f"degree {self.groups.sp_size} (sp sits in megatron-core's CP slot)"
            )

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        attn_mask_type: AttnMaskType | None = None,
        attention_bias: torch.Tensor | None = None,
        packed_seq_params: PackedSeqParams | None = None,
    ) -> torch.Tensor:
        """query: [s/sp, b, hq, d], key/value: [s/sp, b, hkv, d] -> [s/sp, b, hq·d]."""
        if attention_mask is not None or attention_bias is not None:
            raise ValueError(
                "MMSPAttention takes no dense attention_mask/attention_bias (they cannot be split "
                "over sp ranks); pass packing/padding as MMSPPackedSeqParams segment ids"
            )
        params = _UNPACKED if packed_seq_params is None else packed_seq_params
        if not isinstance(params, MMSPPackedSeqParams):
            raise ValueError(
                f"MMSPAttention takes MMSPPackedSeqParams, got {type(params).__name__} "
                f"(format {params.qkv_format})"
            )
        mask_type = self.attn_mask_type if attn_mask_type is None else attn_mask_type
        if mask_type not in _CAUSAL_BY_MASK_TYPE:
            raise ValueError(f"MMSPAttention does not support attn_mask_type {mask_type}")
        if self.groups.ulysses_size == 1 and _views_larger_storage(value):
            # v is a view of the fused QKV projection's output: saved as it is, it would keep
            # that whole buffer (q and k before RoPE too) for the backward. Ulysses' exchange
            # makes its own copy; without it, copy v alone.
            value = value.clone(memory_format=torch.contiguous_format)
        q, k, v = (t.transpose(0, 1) for t in (query, key, value))  # [b, s/sp, h, d]
        out = params.attention(
            q,
            k,
            v,
            layer_number=self.layer_number,
            causal=_CAUSAL_BY_MASK_TYPE[mask_type],
            softmax_scale=self.softmax_scale,
            groups=self.groups,
        )
        s, b = query.shape[0], query.shape[1]
        return out.transpose(0, 1).reshape(s, b, -1)


def _views_larger_storage(t: torch.Tensor) -> bool:
    return t.untyped_storage().nbytes() > t.numel() * t.element_size()


def get_mmsp_gpt_layer_spec(**local_spec_kwargs: Any) -> ModuleSpec:
    """megatron-core's local GPT layer spec with ``core_attention`` = :class:`MMSPAttention`.

    ``local_spec_kwargs`` go to ``get_gpt_layer_local_spec`` (normalization, qk_layernorm, MoE
    options). Multi-latent attention is not supported.
    """
    if local_spec_kwargs.get("multi_latent_attention"):
        raise ValueError("MMSPAttention does not support multi-latent attention")
    return with_mmsp_core_attention(get_gpt_layer_local_spec(**local_spec_kwargs))


def with_mmsp_core_attention(spec: ModuleSpec) -> ModuleSpec:
    """A GPT layer spec (local or Transformer Engine) with ``core_attention`` = MMSPAttention."""
    attention = spec.submodules.self_attention
    attention_submodules = dataclasses.replace(attention.submodules, core_attention=MMSPAttention)
    self_attention = dataclasses.replace(attention, submodules=attention_submodules)
    submodules = dataclasses.replace(spec.submodules, self_attention=self_attention)
    return dataclasses.replace(spec, submodules=submodules)
