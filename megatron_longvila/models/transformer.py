"""The megatron-core pieces both towers are built from: one layer spec and one config builder.

A transformer layer is a :class:`ModuleSpec` tree; the vision tower and the LLM differ only in
the attention mask type, the norm (LayerNorm vs RMSNorm, chosen by the config) and the module
that computes attention from q, k, v (``core_attention``). MM-SP attention enters by passing its
ModuleSpec as ``core_attention``; nothing else in the layer changes.
"""

from __future__ import annotations

from typing import Any

import torch
from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.torch_norm import WrappedTorchNorm
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

from megatron_longvila.core import platform
from megatron_longvila.core.parallel_state import group_size


def transformer_layer_spec(
    core_attention: ModuleSpec | type = DotProductAttention,
    attn_mask_type: AttnMaskType = AttnMaskType.causal,
) -> ModuleSpec:
    """A pre-norm transformer layer of megatron-core local modules.

    Norms are torch's LayerNorm/RMSNorm (``TransformerConfig.normalization`` picks), linears are
    megatron's tensor-parallel ones. The keys map matches megatron-core's local GPT spec, so
    distributed checkpoints use the same names as Transformer Engine layers.
    """
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=WrappedTorchNorm,
            self_attention=ModuleSpec(
                module=SelfAttention,
                params={"attn_mask_type": attn_mask_type},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=ColumnParallelLinear,
                    core_attention=core_attention,
                    linear_proj=RowParallelLinear,
                    q_layernorm=IdentityOp,
                    k_layernorm=IdentityOp,
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=WrappedTorchNorm,
            mlp=ModuleSpec(
                module=MLP,
                submodules=MLPSubmodules(
                    linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear
                ),
            ),
            mlp_bda=get_bias_dropout_add,
            sharded_state_dict_keys_map={
                "input_layernorm.": "self_attention.linear_qkv.layer_norm_",
                "pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_",
            },
        ),
    )


def default_process_groups() -> ProcessGroupCollection:
    """megatron-core's groups from ``parallel_state`` (which must be initialized)."""
    return ProcessGroupCollection.use_mpu_process_groups()


def build_transformer_config(
    pg_collection: ProcessGroupCollection,
    params_dtype: torch.dtype,
    pipeline_parallel: bool,
    architecture: dict[str, Any],
    overrides: dict[str, Any] | None = None,
) -> TransformerConfig:
    """A TransformerConfig for ``architecture`` in the layout of ``pg_collection``.

    Tensor-parallel size comes from the groups; pipeline-parallel size too when
    ``pipeline_parallel`` (the LLM), else 1 (the vision tower lives on one stage). No dropout
    (SigLIP, Qwen2 and Llama train without); fusions that need CUDA kernels are off; weights are
    created on the CPU from the global generator, so every layout starts from the same full
    tensors. ``overrides`` sets run options on top (activation recompute, context-parallel
    size, ...), by TransformerConfig field name.
    """
    if params_dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"params_dtype must be float32, bfloat16 or float16, got {params_dtype}")
    fields = {
        "tensor_model_parallel_size": group_size(pg_collection.tp),
        "pipeline_model_parallel_size": group_size(pg_collection.pp) if pipeline_parallel else 1,
        "params_dtype": params_dtype,
        "pipeline_dtype": params_dtype,
        "bf16": params_dtype == torch.bfloat16,
        "fp16": params_dtype == torch.float16,
        **platform.portable_transformer_options(),
        **architecture,
    }
    return TransformerConfig(**{**fields, **(overrides or {})})
