"""The name of one tensor in a megatron dist checkpoint and in our modules' state dicts.

A dist checkpoint names a tensor by its *sharded key*, which megatron derives from the module
path with two differences (see ``TransformerBlock.sharded_state_dict`` and our layer spec):

* the layers of a transformer block are one tensor with a leading layer axis: the sharded key
  ``llm.decoder.layers.mlp.linear_fc1.weight`` holds layer ``i`` (global numbering over all
  pipeline stages) at index ``i``;
* the norms in front of attention and MLP are named after the linear they feed:
  ``input_layernorm.`` → ``self_attention.linear_qkv.layer_norm_`` and ``pre_mlp_layernorm.`` →
  ``mlp.linear_fc1.layer_norm_`` (the spec's ``sharded_state_dict_keys_map``, so that TE and local
  layers share checkpoints).

*Module names* are what ``LongVILAModel(...).state_dict()`` calls the tensors at tensor- and
pipeline-parallel size 1, e.g. ``llm.decoder.layers.3.input_layernorm.weight``; the full
tensors of a checkpoint are in that TP=1 layout (QKV split by whole query groups and SwiGLU's
``[gate; up]`` are put back together by megatron's sharding metadata).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from megatron_longvila.checkpoint.layout import CheckpointError
from megatron_longvila.models.transformer import transformer_layer_spec

#: Module paths of the transformer blocks whose layers megatron stacks under one sharded key.
LAYER_STACKS = (
    "llm.decoder.layers.",
    "vision_tower.encoder.layers.",
    "vision_tower.unused_layers.layers.",
)
#: Module name prefix within a layer → sharded key prefix.
_KEYS_MAP: dict[str, str] = transformer_layer_spec().submodules.sharded_state_dict_keys_map


def layer_stack_of(key: str) -> str | None:
    """The layer stack prefix a sharded key belongs to, or None for a tensor of its own."""
    return next((stack for stack in LAYER_STACKS if key.startswith(stack)), None)


def module_name(key: str, layer: int | None = None) -> str:
    """Module name (TP=1) of sharded key ``key``; ``layer`` is the index on the layer axis of a
    stacked key (required for those, refused for the others)."""
    stack = layer_stack_of(key)
    if stack is None:
        if layer is not None:
            raise CheckpointError(f"sharded key {key!r} is not a layer stack (layer {layer} given)")
        return key
    if layer is None:
        raise CheckpointError(f"sharded key {key!r} is a layer stack: a layer index is needed")
    rest = key[len(stack) :]
    for module_prefix, sharded_prefix in _KEYS_MAP.items():
        if rest.startswith(sharded_prefix):
            rest = module_prefix + rest[len(sharded_prefix) :]
            break
    return f"{stack}{layer}.{rest}"


def unstack_layers(full: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Full tensors by sharded key (stacked ``[layers, ...]``) → by module name, one per layer."""
    out = {}
    for key, tensor in full.items():
        if layer_stack_of(key) is None:
            out[module_name(key)] = tensor
        else:
            for layer, per_layer in enumerate(tensor.unbind(0)):
                out[module_name(key, layer)] = per_layer
    return out
