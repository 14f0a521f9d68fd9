"""The megatron-core pieces both towers are built from: one block spec and one config builder.

A transformer layer is a :class:`ModuleSpec` tree; the vision tower and the LLM differ only in
the attention mask type, the norm (LayerNorm vs RMSNorm, chosen by the config) and the module
that computes attention from q, k, v (``core_attention``). MM-SP attention enters by passing its
ModuleSpec as ``core_attention``; nothing else in the layer changes.

Two sets of modules build the same layer (``platform.layer_spec_backend()`` picks): ``local``
— megatron-core's own linears and torch norms (:mod:`.norm`), on CPU and GPU; ``te`` —
Transformer Engine's, as megatron-core's TE GPT spec has them (norms fused into the
column-parallel linears after them). Both write the same checkpoint keys.

With tensor parallelism, Megatron's TP sequence parallelism is on (``sequence_parallel``): norms,
residuals and dropout hold ``s/tp`` tokens per rank; the column-parallel linears all-gather the
sequence and the row-parallel ones reduce-scatter it.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.fusions.fused_bias_swiglu import bias_swiglu_impl
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.tensor_parallel.random import CheckpointWithoutOutput
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import (
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

from megatron_longvila.core import platform
from megatron_longvila.core.parallel_state import group_size
from megatron_longvila.models.config import MemoryConfig
from megatron_longvila.models.norm import FinalNorm, Norm


class ActivationRecomputingMLP(MLP):
    """megatron-core's MLP keeping only fc1's output for the backward.

    The activation (SwiGLU: SiLU of the gate half times the linear half; or GELU) runs without
    autograd; its result, fc2's input, is freed once fc2 has run and recomputed from fc1's
    output when the backward reaches fc2 (megatron-core's ``CheckpointWithoutOutput``). Saved
    per token: fc1's output (``2f`` gated, ``f`` otherwise) instead of that plus the activation's
    intermediates and fc2's input. Exact: the recomputation repeats the same elementwise ops.
    """

    def forward(self, hidden_states, per_token_scale=None, **kwargs):
        plain = (
            per_token_scale is None
            and not self.config.use_te_activation_func
            and self.config.activation_func_clamp_value is None
            and self.config.glu_linear_offset == 0.0
        )
        if not (plain and torch.is_grad_enabled()):
            return super().forward(hidden_states, per_token_scale, **kwargs)
        fc1_output, fc1_bias = self.linear_fc1(hidden_states)
        recompute = CheckpointWithoutOutput(fp8=None)  # None: no fp8 state to replay
        activated = recompute.checkpoint(self._activation, fc1_output, fc1_bias)
        output, output_bias = self.linear_fc2(activated)
        recompute.discard_output_and_register_recompute(output)
        return output, output_bias

    def _activation(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        config = self.config
        swiglu = config.gated_linear_unit and config.activation_func is F.silu
        if swiglu and config.bias_activation_fusion:
            return bias_swiglu_impl(x, bias)
        if bias is not None:
            x = x + bias
        if config.gated_linear_unit:
            gate, linear = torch.chunk(x, 2, dim=-1)
            return config.activation_func(gate) * linear
        return config.activation_func(x)


def recompute_mlp_activations(block: torch.nn.Module) -> None:
    """Turn every megatron ``MLP`` of ``block`` into an :class:`ActivationRecomputingMLP` (same
    parameters and state-dict keys; only the forward differs). Applied to built modules because
    megatron's ``TransformerLayer`` hands its process groups only to an ``MLP`` spec it knows."""
    for module in block.modules():
        if type(module) is MLP:
            module.__class__ = ActivationRecomputingMLP


def transformer_block_spec(
    config: TransformerConfig,
    core_attention: ModuleSpec | type = DotProductAttention,
    attn_mask_type: AttnMaskType = AttnMaskType.causal,
    backend: str | None = None,
    vp_stage: int | None = None,
    pp_rank: int | None = None,
) -> TransformerBlockSubmodules:
    """The layers of pipeline stage ``pp_rank`` (of ``config``'s stages) and the final norm,
    from ``backend``'s modules (``"local"`` or ``"te"``; default
    :func:`platform.layer_spec_backend`)."""
    backend = backend or platform.layer_spec_backend()
    if backend == "te":
        from megatron.core.extensions.transformer_engine import TENorm

        layer, final_norm = te_layer_spec(core_attention, attn_mask_type), TENorm
    elif backend == "local":
        layer, final_norm = transformer_layer_spec(core_attention, attn_mask_type), FinalNorm
    else:
        raise ValueError(f"layer spec backend {backend!r} is not one of {platform.LAYER_SPECS}")
    layers = get_num_layers_to_build(config, vp_stage=vp_stage, pp_rank=pp_rank)
    return TransformerBlockSubmodules(layer_specs=[layer] * layers, layer_norm=final_norm)


def te_layer_spec(
    core_attention: ModuleSpec | type = DotProductAttention,
    attn_mask_type: AttnMaskType = AttnMaskType.causal,
) -> ModuleSpec:
    """The layer of :func:`transformer_layer_spec` from Transformer Engine modules, as
    megatron-core's ``get_gpt_layer_with_transformer_engine_spec`` builds it: each norm fused
    into the column-parallel linear after it (``TELayerNormColumnParallelLinear``), TE's
    row-parallel linears. Needs CUDA and Transformer Engine."""
    from megatron.core.extensions.transformer_engine import (
        TELayerNormColumnParallelLinear,
        TERowParallelLinear,
    )

    return _layer_spec(
        core_attention,
        attn_mask_type,
        norm=IdentityOp,
        column_linear=TELayerNormColumnParallelLinear,
        row_linear=TERowParallelLinear,
        keys_map={},
    )


def transformer_layer_spec(
    core_attention: ModuleSpec | type = DotProductAttention,
    attn_mask_type: AttnMaskType = AttnMaskType.causal,
) -> ModuleSpec:
    """A pre-norm transformer layer of megatron-core local modules.

    Norms are :class:`~.norm.Norm` (torch's LayerNorm/RMSNorm, ``TransformerConfig.normalization``
    picks; ready for TP sequence parallelism), linears are megatron's tensor-parallel ones. The
    keys map is megatron-core's local GPT spec's: distributed checkpoints use the names of the
    Transformer Engine layer (:func:`te_layer_spec`).
    """
    return _layer_spec(
        core_attention,
        attn_mask_type,
        norm=Norm,
        column_linear=ColumnParallelLinear,
        row_linear=RowParallelLinear,
        keys_map={
            "input_layernorm.": "self_attention.linear_qkv.layer_norm_",
            "pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_",
        },
    )


def _layer_spec(
    core_attention: ModuleSpec | type,
    attn_mask_type: AttnMaskType,
    norm: type,
    column_linear: type,
    row_linear: type,
    keys_map: dict[str, str],
) -> ModuleSpec:
    """A pre-norm layer: ``norm`` before attention and MLP, ``column_linear`` for QKV and fc1,
    ``row_linear`` for the output projection and fc2."""
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=norm,
            self_attention=ModuleSpec(
                module=SelfAttention,
                params={"attn_mask_type": attn_mask_type},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=column_linear,
                    core_attention=core_attention,
                    linear_proj=row_linear,
                    q_layernorm=IdentityOp,
                    k_layernorm=IdentityOp,
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=norm,
            mlp=ModuleSpec(
                module=MLP,
                submodules=MLPSubmodules(linear_fc1=column_linear, linear_fc2=row_linear),
            ),
            mlp_bda=get_bias_dropout_add,
            sharded_state_dict_keys_map=keys_map,
        ),
    )


def default_process_groups() -> ProcessGroupCollection:
    """megatron-core's groups from ``parallel_state`` (which must be initialized)."""
    return ProcessGroupCollection.use_mpu_process_groups()


def norm_recompute_options(memory: MemoryConfig, overrides: dict[str, Any]) -> dict[str, Any]:
    """TransformerConfig fields for ``memory.norm_keeps_input``: megatron-core's selective
    "layernorm" recomputation. Layer recomputation asked for in ``overrides`` covers the norms
    already; and without Transformer Engine, megatron-core's ``CheckpointWithoutOutput`` works
    only where the CPU adaptations have fixed its fp8 default (CPU runs)."""
    if not memory.norm_keeps_input or overrides.get("recompute_granularity"):
        return {}
    if platform.cuda_available() and not platform.transformer_engine_available():
        return {}
    return {"recompute_granularity": "selective", "recompute_modules": ["layernorm"]}


def transformer_engine_fusions(architecture: dict[str, Any]) -> dict[str, Any]:
    """The fusions of megatron's TE GPT path that this model can take: the fused bias-SwiGLU
    where the MLP is SwiGLU (megatron fuses only gelu/SwiGLU; SigLIP's tanh-GELU stays unfused).
    RoPE fusion stays off: our angles are per token ([s, b, 1, d] from position ids), TE's fused
    RoPE takes one [s, 1, 1, d] table for the whole batch. Gradient-accumulation fusion needs
    megatron's DDP buffers and is set where the model is wrapped
    (:func:`~megatron_longvila.models.longvila_step.build_longvila_model`)."""
    swiglu = bool(architecture.get("gated_linear_unit")) and (
        architecture.get("activation_func") is torch.nn.functional.silu
    )
    return {"bias_activation_fusion": swiglu}


def build_transformer_config(
    pg_collection: ProcessGroupCollection,
    params_dtype: torch.dtype,
    pipeline_parallel: bool,
    architecture: dict[str, Any],
    overrides: dict[str, Any] | None = None,
    memory: MemoryConfig | None = None,
) -> TransformerConfig:
    """A TransformerConfig for ``architecture`` in the layout of ``pg_collection``.

    Tensor-parallel size comes from the groups; pipeline-parallel size too when
    ``pipeline_parallel`` (the LLM), else 1 (the vision tower lives on one stage). No dropout
    (SigLIP, Qwen2 and Llama train without); fusions that need CUDA kernels are off; weights are
    drawn as :func:`platform.weight_init_options` says (on the CPU: from the global generator,
    so every layout starts from the same full tensors). Megatron's TP sequence parallelism is on
    whenever tp > 1. ``overrides`` sets run options on top (activation recompute,
    context-parallel size, ``sequence_parallel=False`` for one-token decoding, ...), by
    TransformerConfig field name; ``memory`` adds the norms' recomputation
    (:func:`norm_recompute_options`).
    """
    if params_dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"params_dtype must be float32, bfloat16 or float16, got {params_dtype}")
    tp = group_size(pg_collection.tp)
    te = platform.layer_spec_backend() == "te"
    fields = {
        "tensor_model_parallel_size": tp,
        "sequence_parallel": tp > 1,
        "pipeline_model_parallel_size": group_size(pg_collection.pp) if pipeline_parallel else 1,
        "params_dtype": params_dtype,
        "pipeline_dtype": params_dtype,
        "bf16": params_dtype == torch.bfloat16,
        "fp16": params_dtype == torch.float16,
        **platform.portable_transformer_options(),
        **(transformer_engine_fusions(architecture) if te else {}),
        **architecture,
    }
    overrides = overrides or {}
    memory_fields = norm_recompute_options(memory or MemoryConfig(), overrides)
    return TransformerConfig(**{**fields, **memory_fields, **overrides})
