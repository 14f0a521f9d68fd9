"""2D attention: Ulysses inside (the all-to-all stays within a node), ring attention outside.

Input is this rank's shard of the sequence in the sp-level layout (zigzag: chunks ``p`` and
``2·sp−1−p`` for sp rank ``p = u + U·r``). The Ulysses all-to-all gathers the shards of the ``U``
ranks of the Ulysses group, so ring rank ``r`` then holds, for ``H/U`` heads, chunks
``U·r .. U·r+U−1`` and their mirrors ``2·sp−U·(r+1) .. 2·sp−1−U·r``: once sorted, that is exactly
the zigzag shard ``r`` of a ring of ``R`` ranks with chunks ``U`` times larger. (Contiguous works
the same way, already sorted.) Ring attention runs on that, and the inverse all-to-all hands each
rank its own tokens back with all heads.

``U = 1`` is ring-only and ``R = 1`` Ulysses-only; both take this same code path.
"""

from __future__ import annotations

import torch

from megatron_longvila.core.parallel_state import MMSPGroups
from megatron_longvila.core.sequence_parallel import comm_stats
from megatron_longvila.core.sequence_parallel.ring import ring_attention
from megatron_longvila.core.sequence_parallel.sharding import shard_token_indices
from megatron_longvila.core.sequence_parallel.ulysses import (
    gather_heads_scatter_sequence,
    replicate_kv_heads,
    scatter_heads_gather_sequence,
)


def ring_order_after_ulysses(
    seq_len: int, ulysses: int, ring: int, ring_rank: int, layout: str, device=None
) -> torch.Tensor | None:
    """Permutation taking the Ulysses-gathered tokens to ring rank ``ring_rank``'s shard order.

    ``None`` when the gathered order already is the ring order (contiguous layout, or U = 1).
    """
    sp = ulysses * ring
    gathered = torch.cat(
        [
            shard_token_indices(seq_len, sp, u + ulysses * ring_rank, layout, device=device)
            for u in range(ulysses)
        ]
    )
    target = shard_token_indices(seq_len, ring, ring_rank, layout, device=device)
    if torch.equal(gathered, target):
        return None
    position = torch.full((seq_len,), -1, dtype=torch.long, device=device)
    position[gathered] = torch.arange(len(gathered), device=device)
    order = position[target]
    if not torch.equal(gathered[order], target):
        raise AssertionError("Ulysses-gathered tokens are not the ring shard (layout mismatch)")
    return order


def hybrid_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    groups: MMSPGroups,
    *,
    causal: bool,
    layout: str,
    scale: float,
    segment_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """q: [b, s/sp, hq, d], k/v: [b, s/sp, hkv, d], segment_ids: [b, s/sp] -> [b, s/sp, hq, d]."""
    ulysses, ring = groups.ulysses_size, groups.ring_size
    if ulysses > 1:
        k, v = replicate_kv_heads(k, ulysses), replicate_kv_heads(v, ulysses)
        q, k, v = (scatter_heads_gather_sequence(t, groups.ulysses) for t in (q, k, v))
        if segment_ids is not None:
            parts = comm_stats.all_gather(segment_ids, groups.ulysses, "ulysses")
            segment_ids = torch.cat(parts, dim=1)
    seq_len = q.shape[1] * ring
    order = ring_order_after_ulysses(
        seq_len, ulysses, ring, groups.ring_rank, layout, device=q.device
    )
    if order is not None:
        q, k, v = (t.index_select(1, order) for t in (q, k, v))
        if segment_ids is not None:
            segment_ids = segment_ids.index_select(1, order)

    out, _ = ring_attention(
        q, k, v, groups.ring, causal=causal, layout=layout, scale=scale, segment_ids=segment_ids
    )

    if order is not None:
        out = out.index_select(1, torch.argsort(order))
    return gather_heads_scatter_sequence(out, groups.ulysses)
