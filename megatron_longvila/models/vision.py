"""SigLIP-style vision tower on megatron-core transformer layers (tensor-parallel).

pixels [n, 3, H, W] → conv patch embedding (no class token) + learned position embeddings →
pre-LayerNorm transformer layers (bidirectional attention, biases everywhere, GELU(tanh) MLP) →
features of the selected layer [n, patches, hidden], exactly what transformers'
``SiglipVisionModel(...).hidden_states[select_layer]`` returns.

The patch embedding, position embeddings and norms are replicated across tensor-parallel ranks;
attention and MLP are split by megatron's column/row-parallel linears.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_block import TransformerBlock
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_longvila.models.config import MemoryConfig, VisionConfig
from megatron_longvila.models.transformer import (
    build_transformer_config,
    default_process_groups,
    recompute_mlp_activations,
    transformer_layer_spec,
)


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GELU with the tanh approximation (SigLIP's ``gelu_pytorch_tanh``)."""
    return F.gelu(x, approximate="tanh")


def vision_transformer_config(
    cfg: VisionConfig,
    pg_collection: ProcessGroupCollection,
    params_dtype: torch.dtype,
    overrides: dict[str, Any] | None = None,
    memory: MemoryConfig | None = None,
) -> TransformerConfig:
    return build_transformer_config(
        pg_collection,
        params_dtype,
        pipeline_parallel=False,
        architecture=dict(
            num_layers=cfg.num_layers,
            hidden_size=cfg.hidden_size,
            num_attention_heads=cfg.num_heads,
            ffn_hidden_size=cfg.ffn_hidden_size,
            normalization="LayerNorm",
            layernorm_epsilon=cfg.layer_norm_eps,
            add_bias_linear=True,
            add_qkv_bias=True,
            gated_linear_unit=False,
            activation_func=gelu_tanh,
        ),
        overrides=overrides,
        memory=memory,
    )


class PoolingHeadWeights(torch.nn.Module):
    """SigLIP's attention-pooling head, laid out as transformers lays it out.

    LongVILA takes patch features and never pools; the head is held (frozen) only so a
    checkpoint that has one converts to ours and back without loss.
    """

    def __init__(self, cfg: VisionConfig, dtype: torch.dtype) -> None:
        super().__init__()
        h = cfg.hidden_size
        self.probe = torch.nn.Parameter(torch.zeros(1, 1, h, dtype=dtype))
        self.attention = torch.nn.MultiheadAttention(h, cfg.num_heads, batch_first=True)
        self.layernorm = torch.nn.LayerNorm(h, eps=cfg.layer_norm_eps)
        self.mlp = torch.nn.Module()
        self.mlp.fc1 = torch.nn.Linear(h, cfg.ffn_hidden_size)
        self.mlp.fc2 = torch.nn.Linear(cfg.ffn_hidden_size, h)
        self.to(dtype)


class VisionTower(MegatronModule):
    """The vision encoder. ``forward(pixels [n, C, H, W]) -> features [n, patches, hidden]``.

    Parameters: ``patch_embedding`` (Conv2d), ``position_embedding`` (Embedding),
    ``encoder`` (a megatron TransformerBlock with the ``cfg.num_layers_to_run`` layers that run;
    its ``final_layernorm`` is SigLIP's post-layernorm), ``unused_layers`` (a block with the
    layers after the selected one, or None) and, with ``cfg.pooling_head``, ``head``. What never
    runs is frozen (see :class:`VisionConfig`). The unused layers are a block of their own so
    that their checkpoint key differs from the trained layers': megatron stacks a block's layers
    under one key, and optimizer state exists only for the trained ones.
    ``transformer_overrides`` sets megatron run options; with ``recompute_granularity="full"``
    every layer is recomputed in the backward pass. ``memory`` says what the layers keep for
    the backward (:class:`~megatron_longvila.models.config.MemoryConfig`).
    """

    def __init__(
        self,
        cfg: VisionConfig,
        *,
        params_dtype: torch.dtype = torch.float32,
        pg_collection: ProcessGroupCollection | None = None,
        transformer_overrides: dict[str, Any] | None = None,
        memory: MemoryConfig | None = None,
    ) -> None:
        pg_collection = pg_collection or default_process_groups()
        memory = memory or MemoryConfig()
        config = vision_transformer_config(
            cfg, pg_collection, params_dtype, transformer_overrides, memory
        )
        super().__init__(config=config)
        self.cfg = cfg
        self.tp_group = pg_collection.tp  # read by MegatronModule.sharded_state_dict
        self.patch_embedding = torch.nn.Conv2d(
            cfg.num_channels,
            cfg.hidden_size,
            kernel_size=cfg.patch_size,
            stride=cfg.patch_size,
            dtype=params_dtype,
        )
        self.position_embedding = torch.nn.Embedding(
            cfg.num_patches, cfg.hidden_size, dtype=params_dtype
        )
        spec = transformer_layer_spec(attn_mask_type=AttnMaskType.no_mask)
        run, tail = cfg.num_layers_to_run, cfg.num_layers - cfg.num_layers_to_run
        self.encoder = TransformerBlock(
            config=dataclasses.replace(config, num_layers=run),
            spec=spec,
            post_layer_norm=True,
            pre_process=True,
            post_process=True,
            pg_collection=pg_collection,
        )
        self.unused_layers = (
            TransformerBlock(
                config=dataclasses.replace(config, num_layers=tail),
                spec=spec,
                post_layer_norm=False,
                pre_process=True,
                post_process=True,
                pg_collection=pg_collection,
            )
            if tail
            else None
        )
        if memory.recompute_activation:
            recompute_mlp_activations(self.encoder)
        self.head = PoolingHeadWeights(cfg, params_dtype) if cfg.pooling_head else None
        for module in self.unused_modules():
            module.requires_grad_(False)

    def unused_modules(self) -> list[torch.nn.Module]:
        """Weights kept for lossless conversion that never run (see :class:`VisionConfig`)."""
        unused: list[torch.nn.Module] = [self.encoder.final_layernorm]
        if self.unused_layers is not None:
            unused.append(self.unused_layers)
        if self.head is not None:
            unused.append(self.head)
        return unused

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels [n, C, H, W] (normalized) → selected layer's features [n, patches, hidden]."""
        cfg = self.cfg
        expected = (cfg.num_channels, cfg.image_size, cfg.image_size)
        if pixels.dim() != 4 or tuple(pixels.shape[1:]) != expected:
            raise ValueError(
                f"vision tower expects frames [n, {', '.join(map(str, expected))}], "
                f"got {tuple(pixels.shape)}"
            )
        x = self.patch_embedding(pixels.to(self.patch_embedding.weight.dtype))  # [n, h, g, g]
        x = x.flatten(2).transpose(1, 2)  # [n, patches, h], patches in row-major order
        x = x + self.position_embedding.weight
        x = x.transpose(0, 1).contiguous()  # megatron layers take [s, b, h]
        recompute = self.config.recompute_granularity == "full"
        for layer in self.encoder.layers:
            if recompute and self.training:
                # Keep only each layer's input; rerun the layer in the backward pass.
                x = tensor_parallel.checkpoint(_layer_output(layer), False, x)
            else:
                x, _ = layer(x, attention_mask=None)
        return x.transpose(0, 1).contiguous()


def _layer_output(layer: torch.nn.Module):
    def run(hidden: torch.Tensor) -> torch.Tensor:
        return layer(hidden, attention_mask=None)[0]

    return run
