"""Splitting a sequence over sequence-parallel ranks, and putting it back together.

Two layouts of a padded global sequence of ``S`` tokens over ``sp`` ranks:

* ``"zigzag"`` (the default): the sequence is cut into ``2·sp`` equal chunks and rank ``r`` keeps
  chunks ``r`` and ``2·sp−1−r``, so under causal attention every rank has the same work. This is
  exactly megatron-core's ``get_batch_on_this_cp_rank`` split, which its RoPE
  (``get_pos_emb_on_this_cp_rank``) also assumes.
* ``"contiguous"``: rank ``r`` keeps tokens ``[r·S/sp, (r+1)·S/sp)``.

``S`` must be a multiple of ``2·sp`` for zigzag and of ``sp`` for contiguous:
:func:`pad_to_multiple` pads first (padding tokens get segment id ``-1`` so nothing attends to
them).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_longvila.core.parallel_state import group_rank, group_size
from megatron_longvila.core.sequence_parallel import comm_stats

LAYOUTS = ("zigzag", "contiguous")


def check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"unknown sequence layout {layout!r}; expected one of {LAYOUTS}")


def sequence_multiple(sp: int, layout: str = "zigzag") -> int:
    """The global sequence length must be a multiple of this for ``layout`` over ``sp`` ranks."""
    check_layout(layout)
    return 2 * sp if layout == "zigzag" else sp


def pad_to_multiple(x: torch.Tensor, multiple: int, dim: int = 1, value: float = 0) -> torch.Tensor:
    """``x`` padded at the end of ``dim`` with ``value`` to the next multiple of ``multiple``."""
    if multiple < 1:
        raise ValueError(f"multiple must be >= 1, got {multiple}")
    length = x.shape[dim]
    extra = -length % multiple
    if extra == 0:
        return x
    shape = list(x.shape)
    shape[dim] = extra
    return torch.cat([x, x.new_full(shape, value)], dim=dim)


def _check_splittable(seq_len: int, sp: int, layout: str) -> None:
    multiple = sequence_multiple(sp, layout)
    if seq_len % multiple:
        raise ValueError(
            f"sequence length {seq_len} is not a multiple of {multiple} "
            f"({layout} layout over sp={sp}); pad it first (pad_to_multiple)"
        )


def shard_token_indices(
    seq_len: int, sp: int, rank: int, layout: str = "zigzag", device=None
) -> torch.Tensor:
    """Global positions, in local order, of the tokens rank ``rank`` holds: ``[seq_len / sp]``."""
    _check_splittable(seq_len, sp, layout)
    if not 0 <= rank < sp:
        raise ValueError(f"rank {rank} is outside sp={sp}")
    if layout == "contiguous":
        n = seq_len // sp
        return torch.arange(rank * n, (rank + 1) * n, device=device)
    chunk = seq_len // (2 * sp)
    first = torch.arange(rank * chunk, (rank + 1) * chunk, device=device)
    last_start = (2 * sp - 1 - rank) * chunk
    return torch.cat([first, torch.arange(last_start, last_start + chunk, device=device)])


def locate_tokens(
    positions: torch.Tensor, seq_len: int, sp: int, layout: str = "zigzag"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Where global positions live after the split: the inverse of :func:`shard_token_indices`.

    positions: [n] global positions in ``[0, seq_len)``.
    Returns (rank [n], local index [n]): ``shard_token_indices(seq_len, sp, rank)[local] ==
    position`` for each entry.
    """
    _check_splittable(seq_len, sp, layout)
    if positions.numel() and (int(positions.min()) < 0 or int(positions.max()) >= seq_len):
        raise ValueError(
            f"positions {int(positions.min())}..{int(positions.max())} must lie in [0, {seq_len})"
        )
    if layout == "contiguous":
        per_rank = seq_len // sp
        return positions // per_rank, positions % per_rank
    chunk = seq_len // (2 * sp)
    index = positions // chunk
    mirrored = index >= sp  # the second chunk of a rank: 2·sp−1−rank
    rank = torch.where(mirrored, 2 * sp - 1 - index, index)
    return rank, positions % chunk + mirrored.long() * chunk


def token_at(
    x: torch.Tensor,
    position: int,
    group: dist.ProcessGroup | None,
    dim: int = 1,
    layout: str = "zigzag",
    name: str = "sp",
) -> torch.Tensor:
    """x: this rank's shard (sequence along ``dim``); returns the entry at global ``position``
    with ``dim`` removed, on every rank of ``group`` (the rank holding it contributes it to an
    all-reduce, the others zeros: the result is exact)."""
    sp, rank = group_size(group), group_rank(group)
    seq_len = x.shape[dim] * sp
    if not 0 <= position < seq_len:
        raise ValueError(f"position {position} is outside the sequence of {seq_len} tokens")
    owner, local = locate_tokens(torch.tensor([position]), seq_len, sp, layout)
    value = x.select(dim, int(local)).clone()
    if sp > 1:
        if int(owner) != rank:
            value.zero_()
        comm_stats.all_reduce_sum(value, group, name)
    return value


def split_sequence(
    x: torch.Tensor, sp: int, rank: int, dim: int = 1, layout: str = "zigzag"
) -> torch.Tensor:
    """The part of ``x`` (full sequence along ``dim``) that rank ``rank`` of ``sp`` holds."""
    index = shard_token_indices(x.shape[dim], sp, rank, layout, device=x.device)
    return x.index_select(dim, index)


def split_zigzag(x: torch.Tensor, sp: int, rank: int, dim: int = 1) -> torch.Tensor:
    """Chunks ``rank`` and ``2·sp−1−rank`` of ``x`` cut into ``2·sp`` along ``dim``."""
    return split_sequence(x, sp, rank, dim, "zigzag")


class _GatherSequence(torch.autograd.Function):
    """All-gather of sequence shards into the full sequence; backward sums the gradients of the
    shard over ranks (the adjoint of the all-gather) and keeps this rank's part."""

    @staticmethod
    def forward(ctx, x, group, dim, layout, name):
        sp, rank = group_size(group), group_rank(group)
        ctx.group, ctx.dim, ctx.layout, ctx.name, ctx.rank = group, dim, layout, name, rank
        parts = comm_stats.all_gather(x, group, name) if sp > 1 else [x]
        seq_len = x.shape[dim] * sp
        positions = torch.cat(
            [shard_token_indices(seq_len, sp, r, layout, device=x.device) for r in range(sp)]
        )
        # Concatenated shards are in rank order; put each token at its global position.
        return torch.cat(parts, dim=dim).index_select(dim, torch.argsort(positions))

    @staticmethod
    def backward(ctx, grad):
        sp = group_size(ctx.group)
        if sp > 1:
            grad = grad.contiguous()
            comm_stats.all_reduce_sum(grad, ctx.group, ctx.name)
        return split_sequence(grad, sp, ctx.rank, ctx.dim, ctx.layout), None, None, None, None


def gather_sequence(
    x: torch.Tensor,
    group: dist.ProcessGroup | None,
    dim: int = 1,
    layout: str = "zigzag",
    name: str = "sp",
) -> torch.Tensor:
    """The full sequence from every rank's shard ``x`` (inverse of :func:`split_sequence`)."""
    check_layout(layout)
    return _GatherSequence.apply(x, group, dim, layout, name)


def gather_zigzag(
    x: torch.Tensor, group: dist.ProcessGroup | None, dim: int = 1, name: str = "sp"
) -> torch.Tensor:
    """Inverse of :func:`split_zigzag` over ``group``, autograd-aware."""
    return gather_sequence(x, group, dim, "zigzag", name)
