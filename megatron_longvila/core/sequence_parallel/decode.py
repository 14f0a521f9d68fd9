"""MM-SP decoding: every rank keeps the keys/values of its own tokens; a new query meets them all.

* **Prefill** (:func:`prefill_attention`): the padded prompt is split zigzag over the ``sp`` ranks
  and attended by :func:`~.attention.mmsp_attention`; each rank then keeps, in its
  :class:`ShardedKVCache`, the keys (after RoPE) and values of the real prompt tokens of its shard
  (padding is dropped).
* **Decode** (:func:`decode_attention`): the new token is computed on every rank (one token,
  replicated: its hidden state, q, k and v are the same everywhere). Its key/value is stored by
  exactly one *owner* rank, the one holding the fewest tokens (lowest rank on ties); every rank
  keeps the same per-rank counts, so all agree on the owner without communicating, and each
  rank's cache stays within one token of ``1/sp`` of the whole once the prompt's padding is made
  up. Each rank then attends the new query over its local cache with the block kernel
  (``kernels.block_forward``, no mask: every cached key precedes the query), the ranks all-gather
  the partial ``(out, lse)`` — ``b·hq·(d+1)`` fp32 values each — and every rank merges the ``sp``
  partials by log-sum-exp in rank order, so all ranks hold the same result bit for bit.
* **In a megatron-core model** (:class:`MMSPKVCacheParams`): passed as ``packed_seq_params``,
  it makes every :class:`~.attention.MMSPAttention` layer prefill on its first call and decode on
  the later ones, so the model's own layers (QKV projection, RoPE from explicit position ids,
  output projection, MLP) run unchanged with their own weights; only the core of attention knows
  about the cache.

Bytes one rank sends per decode step and layer (group ``"sp"``): ``(sp−1)·b·hq·(d+1)·4``
(:func:`decode_bytes_per_rank`). The cache itself never moves.

Local cache layout: ``[b, n_local, hkv, d]`` — prompt tokens in zigzag shard order, then the
decoded tokens this rank owns, in decode order. Order carries no meaning (a decode query attends
to every cached key), so no positions are stored. All rows of a batch share one prompt length.
Decoding is inference only: :func:`decode_attention` builds no autograd graph.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from megatron_longvila.core.parallel_state import MMSPGroups, get_mmsp_groups
from megatron_longvila.core.sequence_parallel import comm_stats, kernels
from megatron_longvila.core.sequence_parallel.attention import MMSPPackedSeqParams, mmsp_attention
from megatron_longvila.core.sequence_parallel.kernels import merge_by_lse
from megatron_longvila.core.sequence_parallel.sharding import shard_token_indices


class ShardedKVCache:
    """This rank's share of one attention layer's keys and values over an sp group.

    ``max_tokens`` (optional): the most tokens (prompt + new, whole group) the cache will hold;
    the buffers are then allocated once at their final size, ``max(own prompt tokens,
    ceil(max_tokens / sp))`` tokens. Without it (or beyond it) they grow by doubling.
    """

    def __init__(self, groups: MMSPGroups | None = None, max_tokens: int | None = None) -> None:
        self.groups = get_mmsp_groups() if groups is None else groups
        self.sp, self.rank = self.groups.sp_size, self.groups.sp_rank
        self.max_tokens = max_tokens
        self.tokens_per_rank = [0] * self.sp  # the same bookkeeping on every rank
        self._keys: torch.Tensor | None = None  # [b, capacity, hkv, d]
        self._values: torch.Tensor | None = None

    # ---- sizes ------------------------------------------------------------------------------
    @property
    def length(self) -> int:
        """Tokens cached over the whole sp group."""
        return sum(self.tokens_per_rank)

    @property
    def local_length(self) -> int:
        """Tokens cached on this rank."""
        return self.tokens_per_rank[self.rank]

    def memory_bytes(self) -> int:
        """Bytes this rank holds for keys and values (allocated buffers)."""
        if self._keys is None:
            return 0
        return sum(t.numel() * t.element_size() for t in (self._keys, self._values))

    def keys(self) -> torch.Tensor:
        """``[b, n_local, hkv, d]``: this rank's cached keys (a view)."""
        return self._stored(self._keys)

    def values(self) -> torch.Tensor:
        """``[b, n_local, hkv, d]``: this rank's cached values (a view)."""
        return self._stored(self._values)

    def _stored(self, buffer: torch.Tensor | None) -> torch.Tensor:
        if buffer is None:
            raise RuntimeError("the KV cache is empty: store the prompt first (store_prompt)")
        return buffer[:, : self.local_length]

    # ---- writing ----------------------------------------------------------------------------
    def store_prompt(
        self, k_shard: torch.Tensor, v_shard: torch.Tensor, prompt_length: int
    ) -> None:
        """Keep the real prompt tokens of this rank's zigzag shard.

        k_shard, v_shard: [b, S/sp, hkv, d], this rank's zigzag shard of the prompt padded to
        ``S`` tokens; ``prompt_length``: the real tokens (global positions ``< prompt_length``).
        """
        if self.length:
            raise RuntimeError(f"store_prompt on a cache that already holds {self.length} tokens")
        if k_shard.shape != v_shard.shape or k_shard.dim() != 4:
            raise ValueError(
                f"k/v shards must be [b, S/sp, hkv, d] of one shape, got {tuple(k_shard.shape)} "
                f"and {tuple(v_shard.shape)}"
            )
        padded = k_shard.shape[1] * self.sp
        if not 0 < prompt_length <= padded:
            raise ValueError(
                f"prompt_length {prompt_length} must be in 1..{padded} (the padded prompt: "
                f"{k_shard.shape[1]} tokens on each of {self.sp} ranks)"
            )
        real = [
            shard_token_indices(padded, self.sp, r, "zigzag") < prompt_length
            for r in range(self.sp)
        ]
        self.tokens_per_rank = [int(mask.sum()) for mask in real]
        mine = real[self.rank].to(k_shard.device)
        self._allocate(k_shard, self._capacity())
        n = self.local_length
        self._keys[:, :n] = k_shard[:, mine]
        self._values[:, :n] = v_shard[:, mine]

    def next_owner(self) -> int:
        """The sp rank that stores the next appended token: the fewest tokens, lowest rank."""
        return min(range(self.sp), key=lambda r: (self.tokens_per_rank[r], r))

    def append(self, k_new: torch.Tensor, v_new: torch.Tensor) -> bool:
        """Store one new token if this rank owns it; every rank must call this for every token.

        k_new, v_new: [b, 1, hkv, d], the same on every sp rank. Returns whether it was stored here.
        """
        if self._keys is None:
            raise RuntimeError("append before store_prompt: the cache has no prompt yet")
        if k_new.shape != (*self._keys.shape[:1], 1, *self._keys.shape[2:]) or (
            v_new.shape != k_new.shape
        ):
            raise ValueError(
                f"append takes k/v of shape [b, 1, hkv, d] = "
                f"{(self._keys.shape[0], 1, *self._keys.shape[2:])}, got {tuple(k_new.shape)} "
                f"and {tuple(v_new.shape)}"
            )
        owner = self.next_owner()
        if owner == self.rank:
            n = self.local_length
            if n == self._keys.shape[1]:
                self._allocate(self._keys, max(1, 2 * n))
            self._keys[:, n] = k_new[:, 0]
            self._values[:, n] = v_new[:, 0]
        self.tokens_per_rank[owner] += 1
        return owner == self.rank

    def rewind(self, tokens_per_rank: list[int]) -> None:
        """Forget the tokens appended since the cache held ``tokens_per_rank`` (a copy of that
        attribute taken earlier): each rank's later tokens sit at the end of its buffer, so
        lowering the counts drops exactly them. Every rank must rewind alike."""
        if len(tokens_per_rank) != self.sp or any(
            not 0 <= new <= now for new, now in zip(tokens_per_rank, self.tokens_per_rank)
        ):
            raise ValueError(
                f"cannot rewind a cache holding {self.tokens_per_rank} tokens per rank to "
                f"{tokens_per_rank}: rewinding only drops tokens"
            )
        self.tokens_per_rank = list(tokens_per_rank)

    def _capacity(self) -> int:
        balanced = math.ceil(self.max_tokens / self.sp) if self.max_tokens else 0
        return max(self.local_length, balanced)

    def _allocate(self, like: torch.Tensor, capacity: int) -> None:
        """(Re)allocate the buffers for ``capacity`` local tokens, keeping what they hold."""
        b, _, heads, d = like.shape
        old = (self._keys, self._values)
        self._keys, self._values = (like.new_empty(b, capacity, heads, d) for _ in range(2))
        if old[0] is not None:
            n = self.local_length
            self._keys[:, :n], self._values[:, :n] = old[0][:, :n], old[1][:, :n]


def prefill_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cache: ShardedKVCache,
    prompt_length: int,
    *,
    softmax_scale: float | None = None,
) -> torch.Tensor:
    """Causal attention over the prompt (2D MM-SP, zigzag), then cache this rank's K/V.

    q: [b, S/sp, hq, d], k/v: [b, S/sp, hkv, d] (k after RoPE): this rank's zigzag shard of the
    prompt padded to ``S`` (a multiple of ``2·sp``); ``prompt_length`` real tokens.
    Returns [b, S/sp, hq, d].
    """
    out = mmsp_attention(
        q, k, v, causal=True, softmax_scale=softmax_scale, groups=cache.groups, layout="zigzag"
    )
    cache.store_prompt(k.detach(), v.detach(), prompt_length)
    return out


@torch.no_grad()
def decode_attention(
    q: torch.Tensor,
    local_k: torch.Tensor,
    local_v: torch.Tensor,
    groups: MMSPGroups | None = None,
    *,
    softmax_scale: float | None = None,
) -> torch.Tensor:
    """Attention of one new token over the keys/values cached on all ranks of the sp group.

    q: [b, 1, hq, d], the same on every sp rank; local_k, local_v: [b, n, hkv, d], this rank's
    cache (``n`` may be 0; ``hkv`` divides ``hq``). Returns [b, 1, hq, d], the same on every rank.
    """
    groups = get_mmsp_groups() if groups is None else groups
    if q.dim() != 4 or q.shape[1] != 1:
        raise ValueError(
            f"decode_attention takes one new token, q [b, 1, hq, d]; got {tuple(q.shape)}"
        )
    if (
        local_k.shape != local_v.shape
        or local_k.dim() != 4
        or (local_k.shape[0], local_k.shape[3]) != (q.shape[0], q.shape[3])
    ):
        raise ValueError(
            f"cache k/v {tuple(local_k.shape)}, {tuple(local_v.shape)} must be [b, n, hkv, d] "
            f"matching q {tuple(q.shape)} in batch and head dim"
        )
    b, _, heads, d = q.shape
    scale = 1.0 / math.sqrt(d) if softmax_scale is None else softmax_scale
    if local_k.shape[1]:
        out, lse = kernels.block_forward(q, local_k, local_v, scale=scale, causal=False)
        out = out.float()
    else:  # nothing cached here: a partial result of weight zero
        out = q.new_zeros(q.shape, dtype=torch.float32)
        lse = q.new_full((b, heads, 1), float("-inf"), dtype=torch.float32)
    if groups.sp_size == 1:
        return out.to(q.dtype)
    partial = torch.cat([out[:, 0], lse], dim=-1)  # [b, hq, d+1]: one message per rank
    merged_out = torch.zeros_like(out)
    merged_lse = torch.full_like(lse, float("-inf"))
    for part in comm_stats.all_gather(partial, groups.sp, "sp"):
        merged_out, merged_lse = merge_by_lse(
            merged_out, merged_lse, part[:, None, :, :d], part[..., d:]
        )
    return merged_out.to(q.dtype)


def decode_bytes_per_rank(batch: int, heads: int, head_dim: int, sp: int) -> int:
    """Bytes one rank sends in one :func:`decode_attention` call: the all-gathered partials."""
    return (sp - 1) * batch * heads * (head_dim + 1) * 4


@dataclasses.dataclass(kw_only=True)
class MMSPKVCacheParams(MMSPPackedSeqParams):
    """KV-cached inference through :class:`~.attention.MMSPAttention`, one object per sequence.

    Passed as ``packed_seq_params`` (megatron-core hands it to every layer's ``core_attention``
    unchanged), it turns the layer's attention into :func:`prefill_attention` on the layer's first
    call — creating that layer's :class:`ShardedKVCache` — and into ``append`` +
    :func:`decode_attention` on every later call (one new token, the same on every sp rank).
    Caches are keyed by the layer's number, so one object serves a whole layer stack.

    prompt_length: real tokens of the prompt (its zigzag shards are padded to a multiple of 2·sp).
    max_tokens: tokens the caches will hold at most (prompt + new), reserved up front.
    """

    prompt_length: int
    max_tokens: int | None = None
    caches: dict[int, ShardedKVCache] = dataclasses.field(default_factory=dict)

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
        """Prefill (q, k, v: [b, S/sp, h, d] zigzag shards) or decode (q, k, v: [b, 1, h, d])."""
        if not causal:
            raise ValueError("KV-cached decoding needs causal attention")
        cache = self.caches.get(layer_number)
        if cache is None:
            cache = self.caches[layer_number] = ShardedKVCache(groups, self.max_tokens)
            return prefill_attention(
                q, k, v, cache, self.prompt_length, softmax_scale=softmax_scale
            )
        cache.append(k, v)
        return decode_attention(
            q, cache.keys(), cache.values(), cache.groups, softmax_scale=softmax_scale
        )

    @property
    def length(self) -> int:
        """Tokens cached over the sp group (prompt + decoded tokens run so far)."""
        return next(iter(self.caches.values())).length if self.caches else 0

    def memory_bytes(self) -> int:
        """Bytes of keys and values this rank holds, over all layers."""
        return sum(cache.memory_bytes() for cache in self.caches.values())

    def tokens_per_rank(self) -> list[int]:
        """Tokens each sp rank caches (the same in every layer); pass to :meth:`rewind`."""
        return list(next(iter(self.caches.values())).tokens_per_rank)

    def rewind(self, tokens_per_rank: list[int]) -> None:
        """Drop, in every layer, the tokens appended since :meth:`tokens_per_rank` was read."""
        for cache in self.caches.values():
            cache.rewind(tokens_per_rank)
