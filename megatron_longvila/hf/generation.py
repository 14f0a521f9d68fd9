"""Greedy generation with a transformers model under MM-SP, the KV cache sharded over sp.

The prompt is split like a training batch (zigzag, global position ids) and prefilled with
MM-SP attention; :class:`MMSPCache` keeps each layer's keys/values in a
:class:`~megatron_longvila.core.sequence_parallel.decode.ShardedKVCache` (this rank's prompt
tokens, then the decoded tokens it owns). Each new token runs on every rank, and its attention
merges the ranks' partial results (``mmsp_decode=True`` tells the attention function so).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from megatron_longvila.core.parallel_state import MMSPGroups
from megatron_longvila.core.sequence_parallel.decode import ShardedKVCache
from megatron_longvila.hf.sharding import MMSPSharding


class MMSPCacheLayer(CacheLayerMixin):
    """One layer's :class:`ShardedKVCache` behind transformers' cache-layer contract.

    ``update`` takes and returns ``[b, hkv, s, d]``: the first call (prefill, this rank's zigzag
    shard of the padded prompt) stores the real prompt tokens and returns its input for
    ``mmsp_attention``; each later call (one new token) stores it on its owner rank and returns
    this rank's whole cache for ``decode_attention``.
    """

    is_sliding = False

    def __init__(self, groups: MMSPGroups, prompt_length: int, max_tokens: int) -> None:
        super().__init__()
        self.sharded = ShardedKVCache(groups, max_tokens)
        self.prompt_length = prompt_length

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = key_states.transpose(1, 2), value_states.transpose(1, 2)
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
            self.sharded.store_prompt(k, v, self.prompt_length)
            return key_states, value_states
        self.sharded.append(k, v)
        return self.sharded.keys().transpose(1, 2), self.sharded.values().transpose(1, 2)

    def get_seq_length(self) -> int:
        return self.sharded.length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.sharded.length + query_length, 0

    def get_max_length(self) -> int:
        return -1


class MMSPCache(Cache):
    """transformers ``Cache`` of :class:`MMSPCacheLayer`: one per decoder layer."""

    def __init__(
        self, num_layers: int, groups: MMSPGroups, prompt_length: int, max_tokens: int
    ) -> None:
        super().__init__(
            layers=[MMSPCacheLayer(groups, prompt_length, max_tokens) for _ in range(num_layers)]
        )

    def memory_bytes(self) -> int:
        """Bytes of keys and values this rank holds, over all layers."""
        return sum(layer.sharded.memory_bytes() for layer in self.layers)


@dataclass
class Generation:
    """tokens: [b, s + n] prompt then generated tokens; logits: [b, n, vocab], the logits each
    new token was chosen from; cache: this rank's share of the KV cache."""

    tokens: torch.Tensor
    logits: torch.Tensor
    cache: MMSPCache


@torch.no_grad()
def greedy_generate(
    model: torch.nn.Module, sharding: MMSPSharding, input_ids: torch.Tensor, max_new_tokens: int
) -> Generation:
    """Greedy decoding of exactly ``max_new_tokens`` tokens; every sp rank returns the same.

    model: a transformers causal LM whose ``config._attn_implementation`` is
    ``sharding.attn_implementation``; input_ids: [b, s], the same prompt on every sp rank (rows of
    one length, no padding).
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if model.config._attn_implementation != sharding.attn_implementation:
        raise ValueError(
            f"the model runs attention {model.config._attn_implementation!r}, not the MM-SP "
            f"implementation {sharding.attn_implementation!r}"
        )
    b, prompt_length = input_ids.shape
    # The last new token is chosen but never run, so it is never cached.
    cache = MMSPCache(
        model.config.num_hidden_layers,
        sharding.groups,
        prompt_length,
        max_tokens=prompt_length + max_new_tokens - 1,
    )
    batch = sharding.shard_batch(input_ids)
    logits = model(
        input_ids=batch.input_ids, position_ids=batch.position_ids, cache=cache, use_cache=True
    ).logits
    last = sharding.value_at(logits, prompt_length - 1)  # [b, vocab]
    tokens, step_logits = [input_ids], []
    for step in range(max_new_tokens):
        step_logits.append(last)
        tokens.append(last.argmax(-1, keepdim=True))
        if step + 1 == max_new_tokens:
            break
        position = torch.full((b, 1), prompt_length + step, device=input_ids.device)
        last = model(
            input_ids=tokens[-1],
            position_ids=position,
            cache=cache,
            use_cache=True,
            mmsp_decode=True,
        ).logits[:, -1]
    return Generation(torch.cat(tokens, dim=1), torch.stack(step_logits, dim=1), cache)
