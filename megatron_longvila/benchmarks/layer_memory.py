"""Measured activation memory of the LLM: bytes a decoder layer keeps for its backward, and the
peak of the output layer + loss, for a :class:`~megatron_longvila.models.config.MemoryConfig`.

Both run the project's own :class:`~megatron_longvila.models.llm.LanguageModel` (MM-SP attention,
the layer spec of the device) in the current MM-SP groups, and count tensor bytes with
:class:`~megatron_longvila.core.memory_tracking.TensorMemoryMeter`:

* :func:`saved_bytes_per_layer`: bytes alive after the forward of ``L + 1`` layers minus those of
  ``1`` layer, divided by ``L``: what each further layer keeps (embedding, final norm and loss
  cancel out).
* :func:`loss_peak_bytes`: the most bytes held at once by the output layer and the cross entropy
  in forward + backward, beyond their input and weights (their gradients included).

The cost model's :func:`~megatron_longvila.planning.cost_model.layer_activation_bytes` and
:func:`~megatron_longvila.planning.cost_model.loss_peak_bytes` are checked against these.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from megatron_longvila.core.memory_tracking import TensorMemoryMeter
from megatron_longvila.models.config import LLMConfig, MemoryConfig
from megatron_longvila.planning.workload import GPTShape


def _llm_config(shape: GPTShape, layers: int) -> LLMConfig:
    return LLMConfig(
        vocab_size=shape.vocab,
        hidden_size=shape.hidden,
        num_layers=layers,
        num_heads=shape.heads,
        num_kv_heads=shape.kv_heads,
        ffn_hidden_size=shape.ffn_hidden,
        qkv_bias=False,
        max_position_embeddings=1 << 20,
    )


def _build(shape: GPTShape, layers: int, memory: MemoryConfig, dtype: torch.dtype):
    from megatron.core import parallel_state

    from megatron_longvila.core import platform
    from megatron_longvila.core.sequence_parallel.attention import MMSPAttention
    from megatron_longvila.models.llm import LanguageModel

    platform.seed_everything(0)
    model = LanguageModel(
        _llm_config(shape, layers),
        core_attention=MMSPAttention,
        params_dtype=dtype,
        memory=memory,
        transformer_overrides={
            "context_parallel_size": parallel_state.get_context_parallel_world_size()
        },
    )
    return model.to(platform.local_device())


def _saved_after_forward(
    shape: GPTShape, layers: int, tokens: int, memory: MemoryConfig, dtype: torch.dtype
) -> int:
    from megatron_longvila.core import platform

    model = _build(shape, layers, memory, dtype)
    device = platform.local_device()
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, shape.vocab, (1, tokens), generator=gen).to(device)
    positions = torch.arange(tokens, device=device).unsqueeze(0)
    with TensorMemoryMeter(device) as meter:
        losses = model(ids, positions, labels=ids)
        saved = meter.current - losses.numel() * losses.element_size()
        losses.sum().backward()
    return saved


def saved_bytes_per_layer(
    shape: GPTShape,
    tokens: int,
    memory: MemoryConfig,
    dtype: torch.dtype = torch.float32,
    layers: int = 2,
) -> float:
    """Bytes one decoder layer keeps for the backward at ``tokens`` tokens on this rank (one
    row; this rank's shard in the MM-SP groups of megatron-core's parallel state, which must be
    initialized)."""
    one = _saved_after_forward(shape, 1, tokens, memory, dtype)
    more = _saved_after_forward(shape, 1 + layers, tokens, memory, dtype)
    return (more - one) / layers


def loss_peak_bytes(
    shape: GPTShape, tokens: int, chunk_tokens: int | None, dtype: torch.dtype = torch.float32
) -> int:
    """Peak bytes of the output layer + cross entropy (forward and backward) of ``tokens``
    tokens, beyond the hidden states and the weights (gradients included); ``chunk_tokens`` as
    :attr:`MemoryConfig.loss_chunk_tokens`. One rank, tp = 1, no megatron DDP."""
    from megatron_longvila.core import platform

    memory = replace(MemoryConfig(), loss_chunk_tokens=chunk_tokens)
    model = _build(replace(shape, layers=1), 1, memory, dtype)
    device = platform.local_device()
    gen = torch.Generator().manual_seed(2)
    hidden = torch.randn(tokens, 1, shape.hidden, generator=gen, dtype=dtype).to(device)
    hidden.requires_grad_()
    labels = torch.randint(0, shape.vocab, (1, tokens), generator=gen).to(device)
    with TensorMemoryMeter(device) as meter:
        model.token_losses(hidden, labels).sum().backward()
    return meter.peak
