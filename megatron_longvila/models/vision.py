"""SigLIP-style vision tower on megatron-core transformer layers (tensor-parallel).

pixels [n, 3, H, W] → conv patch embedding (no class token) + learned position embeddings →
pre-LayerNorm transformer layers (bidirectional attention, biases everywhere, GELU(tanh) MLP) →
features of the selected layer [n, patches, hidden], exactly what transformers'
``SiglipVisionModel(...).hidden_states[select_layer]`` returns.

The patch embedding, position embeddings and norms are replicated across tensor-parallel ranks;
attention and MLP are split by megatron's column/row-parallel linears. Under Megatron's TP
sequence parallelism (tp > 1) each rank's layers hold ``patches/tp`` of every frame's patches
outside attention and MLP: the patch sequence is padded to a multiple of tp (the padding is
masked out as a key and dropped at the end), split, and gathered after the last layer.
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
    transformer_block_spec,
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
        run, tail = cfg.num_layers_to_run, cfg.num_layers - cfg.num_layers_to_run

        def spec(num_layers: int):  # the tower lives on one pipeline stage
            return transformer_block_spec(
                dataclasses.replace(config, num_layers=num_layers),
                attn_mask_type=AttnMaskType.no_mask,
                pp_rank=0,
            )

        self.encoder = TransformerBlock(
            config=dataclasses.replace(config, num_layers=run),
            spec=spec(run),
            post_layer_norm=True,
            pre_process=True,
            post_process=True,
            pg_collection=pg_collection,
        )
        self.unused_layers = (
            TransformerBlock(
                config=dataclasses.replace(config, num_layers=tail),
                spec=spec(tail),
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
        patches = x.shape[0]
        mask = None
        if self.config.sequence_parallel:
            x, mask = self._split_patches(x)
        recompute = self.config.recompute_granularity == "full"
        for layer in self.encoder.layers:
            if recompute and self.training:
                # Keep only each layer's input; rerun the layer in the backward pass.
                x = tensor_parallel.checkpoint(_layer_output(layer, mask), False, x)
            else:
                x, _ = layer(x, attention_mask=mask)
        if self.config.sequence_parallel:
            x = tensor_parallel.gather_from_sequence_parallel_region(
                x, tensor_parallel_output_grad=False, group=self.tp_group
            )[:patches]
        return x.transpose(0, 1).contiguous()

    def _split_patches(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x [patches, n, h] → (this rank's [padded/tp, n, h], key mask [1, 1, 1, padded] True
        at the padding, or None without padding)."""
        tp = self.config.tensor_model_parallel_size
        pad = -x.shape[0] % tp
        mask = None
        if pad:
            x = F.pad(x, (0, 0, 0, 0, 0, pad))
            mask = torch.zeros(1, 1, 1, x.shape[0], dtype=torch.bool, device=x.device)
            mask[..., -pad:] = True
        part = tensor_parallel.scatter_to_sequence_parallel_region(x, group=self.tp_group)
        return part.clone(), mask  # a copy, so that the whole sequence is not kept alive


def _layer_output(layer: torch.nn.Module, mask: torch.Tensor | None):
    def run(hidden: torch.Tensor) -> torch.Tensor:
        return layer(hidden, attention_mask=mask)[0]

    return run
