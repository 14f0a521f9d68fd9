"""Ulysses: trade a sequence shard with all heads for the whole (group's) sequence with few heads.

Inside a Ulysses group of ``U`` ranks, :func:`scatter_heads_gather_sequence` turns
``[b, s/U, h, d]`` into ``[b, s, h/U, d]`` with one all-to-all: rank ``j`` receives head group
``j`` (heads ``j·h/U .. (j+1)·h/U − 1``) of every rank's tokens, concatenated in group-rank order.
:func:`gather_heads_scatter_sequence` is the inverse. Both are autograd functions whose backward
is the other all-to-all.

GQA: with fewer key/value heads than ``U``, :func:`replicate_kv_heads` repeats each kv head so
that Ulysses rank ``j`` receives exactly the kv head its query heads use; autograd sums the
gradients of the copies back into the original head. No head is ever dropped.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_longvila.core.parallel_state import group_size
from megatron_longvila.core.sequence_parallel import comm_stats
from megatron_longvila.core.topology import replicated_kv_heads

SEQ_DIM, HEAD_DIM = 1, 2


def _exchange(
    x: torch.Tensor, group: dist.ProcessGroup, scatter_dim: int, gather_dim: int, name: str
) -> torch.Tensor:
    """Split ``scatter_dim`` into ``n`` parts sent to ranks ``0..n-1``; concatenate what arrives
    along ``gather_dim`` in source-rank order."""
    n = group_size(group)
    if x.shape[scatter_dim] % n:
        raise ValueError(
            f"Ulysses all-to-all over {n} ranks: dim {scatter_dim} of shape {tuple(x.shape)} "
            f"is not divisible by {n}"
        )
    received = comm_stats.all_to_all(torch.stack(x.chunk(n, dim=scatter_dim)), group, name)
    return torch.cat(received.unbind(0), dim=gather_dim)


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, scatter_dim, gather_dim, name):
        ctx.group, ctx.scatter_dim, ctx.gather_dim, ctx.name = group, scatter_dim, gather_dim, name
        return _exchange(x, group, scatter_dim, gather_dim, name)

    @staticmethod
    def backward(ctx, grad):
        back = _exchange(grad, ctx.group, ctx.gather_dim, ctx.scatter_dim, ctx.name)
        return back, None, None, None, None


def scatter_heads_gather_sequence(
    x: torch.Tensor, group: dist.ProcessGroup | None, name: str = "ulysses"
) -> torch.Tensor:
    """``x: [b, s/U, h, d]`` -> ``[b, s, h/U, d]`` (sequence in group-rank order)."""
    if group_size(group) == 1:
        return x
    return _AllToAll.apply(x, group, HEAD_DIM, SEQ_DIM, name)


def gather_heads_scatter_sequence(
    x: torch.Tensor, group: dist.ProcessGroup | None, name: str = "ulysses"
) -> torch.Tensor:
    """``x: [b, s, h/U, d]`` -> ``[b, s/U, h, d]``: the inverse of the above."""
    if group_size(group) == 1:
        return x
    return _AllToAll.apply(x, group, SEQ_DIM, HEAD_DIM, name)


def replicate_kv_heads(kv: torch.Tensor, ulysses: int) -> torch.Tensor:
    """``kv: [b, s, g, d]`` with each head repeated until ``ulysses`` ranks can share them out.

    Unchanged when ``ulysses`` divides ``g``; otherwise (``g`` must divide ``ulysses``) every head
    is repeated ``ulysses / g`` times in place, so rank ``j`` gets head ``j // (ulysses / g)`` —
    the kv head of its query heads.
    """
    heads = kv.shape[HEAD_DIM]
    target = replicated_kv_heads(heads, ulysses)
    if target == heads:
        return kv
    return kv.repeat_interleave(target // heads, dim=HEAD_DIM)
