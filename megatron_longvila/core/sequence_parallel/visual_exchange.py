"""Stage 1 of MM-SP's two-stage sharding: frames over ranks, visual tokens to their owners.

Every rank of an sp group holds the same batch. Its ``F`` frames (all media items, in order,
frames in order) are numbered ``0 .. F−1`` and cut into ``sp`` contiguous runs whose lengths
differ by at most one (:func:`frames_per_rank`); each rank encodes its run only. Frame ``f``
becomes visual tokens ``f·T .. f·T+T−1`` (``T`` tokens per frame), and each visual token has a
place in the stage-2 (zigzag) split of the sequence: an owner rank and a slot in that rank's
shard. :class:`VisualTokenRoute` says, for one rank, which of its tokens go to which rank and
where the tokens it receives belong; :func:`deliver_visual_tokens` moves them with a single
all-to-all whose per-rank counts are exactly those tokens (nothing is broadcast or all-reduced).
Its backward pass is the reverse all-to-all: each gradient row returns to the rank that encoded
the frame.

Bytes sent (forward) by rank ``r``: ``(visual tokens encoded on r, owned by another rank) ×
hidden × bytes per element`` (:meth:`VisualTokenRoute.sent_to_others`); backward:
``(visual tokens owned by r, encoded on another rank) × hidden × bytes per element``
(:meth:`VisualTokenRoute.received_from_others`). Gathering the whole buffer on every rank, as
an all-reduce does, costs ``2(sp−1)/sp × all visual tokens × hidden × bytes`` instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron_longvila.core.parallel_state import group_size
from megatron_longvila.core.sequence_parallel import comm_stats


def frames_per_rank(num_frames: int, sp: int) -> list[int]:
    """How many frames each of ``sp`` ranks encodes: ``num_frames`` split as evenly as possible,
    the first ``num_frames mod sp`` ranks taking one more (21 frames over 4 ranks → 6/5/5/5)."""
    if sp < 1 or num_frames < 0:
        raise ValueError(f"cannot split {num_frames} frames over sp={sp} ranks")
    base, extra = divmod(num_frames, sp)
    return [base + (rank < extra) for rank in range(sp)]


def frame_range(num_frames: int, sp: int, rank: int) -> tuple[int, int]:
    """``[start, stop)`` of the frames rank ``rank`` encodes (see :func:`frames_per_rank`)."""
    counts = frames_per_rank(num_frames, sp)
    if not 0 <= rank < sp:
        raise ValueError(f"rank {rank} is outside sp={sp}")
    start = sum(counts[:rank])
    return start, start + counts[rank]


@dataclass(frozen=True)
class VisualTokenRoute:
    """How the visual tokens of one micro-batch travel, as seen by one sp rank.

    send_index:  [sum(send_counts)] rows of this rank's encoded tokens ``[frames·T, hidden]``,
                 grouped by destination rank (ascending), in token order within a group.
    send_counts: tokens sent to each rank (this rank's own entry stays local).
    recv_counts: tokens received from each rank.
    recv_slots:  [sum(recv_counts)] where each received token goes in this rank's shard, in the
                 order they arrive (by source rank, then token order); a slot is an index into
                 the shard flattened as ``[s/sp · b]`` (slot = local position · b + row).
    """

    rank: int
    num_local_tokens: int
    send_index: torch.Tensor
    send_counts: list[int]
    recv_counts: list[int]
    recv_slots: torch.Tensor

    @classmethod
    def build(
        cls,
        token_owner: torch.Tensor,
        token_slot: torch.Tensor,
        tokens_per_frame: int,
        sp: int,
        rank: int,
    ) -> VisualTokenRoute:
        """The route of rank ``rank`` from the owner rank and slot of every visual token.

        token_owner, token_slot: [F·T] for the visual tokens of the batch in frame order.
        """
        total = token_owner.numel()
        if total % tokens_per_frame or token_slot.numel() != total:
            raise ValueError(
                f"{total} visual token owners and {token_slot.numel()} slots do not describe "
                f"whole frames of {tokens_per_frame} tokens"
            )
        ranges = [frame_range(total // tokens_per_frame, sp, r) for r in range(sp)]
        start, stop = (f * tokens_per_frame for f in ranges[rank])
        mine = token_owner[start:stop]
        # A stable sort keeps token order within each destination.
        send_index = torch.sort(mine, stable=True).indices
        send_counts = torch.bincount(mine, minlength=sp).tolist()
        owned = (token_owner == rank).nonzero().flatten()  # ascending: source rank, then token
        recv_counts = [
            int(((owned >= a * tokens_per_frame) & (owned < b * tokens_per_frame)).sum())
            for a, b in ranges
        ]
        return cls(
            rank=rank,
            num_local_tokens=stop - start,
            send_index=send_index,
            send_counts=send_counts,
            recv_counts=recv_counts,
            recv_slots=token_slot[owned],
        )

    def sent_to_others(self) -> int:
        """Visual tokens this rank encodes for other ranks (rows it sends in the forward pass)."""
        return sum(self.send_counts) - self.send_counts[self.rank]

    def received_from_others(self) -> int:
        """Visual tokens this rank holds that another rank encoded (rows it sends back in the
        backward pass)."""
        return sum(self.recv_counts) - self.recv_counts[self.rank]

    def to(self, device: torch.device | str) -> VisualTokenRoute:
        return VisualTokenRoute(
            rank=self.rank,
            num_local_tokens=self.num_local_tokens,
            send_index=self.send_index.to(device),
            send_counts=self.send_counts,
            recv_counts=self.recv_counts,
            recv_slots=self.recv_slots.to(device),
        )


class _AllToAllV(torch.autograd.Function):
    """Rows to their destinations; the backward sends each gradient row back to its source."""

    @staticmethod
    def forward(ctx, x, send_counts, recv_counts, group, name):
        ctx.send_counts, ctx.recv_counts, ctx.group, ctx.name = (
            send_counts,
            recv_counts,
            group,
            name,
        )
        return comm_stats.all_to_all_v(x, send_counts, recv_counts, group, name)

    @staticmethod
    def backward(ctx, grad):
        back = comm_stats.all_to_all_v(grad, ctx.recv_counts, ctx.send_counts, ctx.group, ctx.name)
        return back, None, None, None, None


def deliver_visual_tokens(
    tokens: torch.Tensor,
    route: VisualTokenRoute,
    group: dist.ProcessGroup | None,
    name: str = "sp",
) -> torch.Tensor:
    """Send this rank's encoded visual tokens to the ranks whose shards hold their positions.

    tokens: [frames_here · T, hidden] (this rank's frames, token order).
    Returns [sum(route.recv_counts), hidden], row ``i`` belonging at ``route.recv_slots[i]``.
    """
    if tokens.shape[0] != route.num_local_tokens:
        raise ValueError(
            f"rank {route.rank} encoded {tokens.shape[0]} visual tokens, its route expects "
            f"{route.num_local_tokens}"
        )
    outgoing = tokens.index_select(0, route.send_index)
    if group_size(group) == 1:
        return outgoing
    return _AllToAllV.apply(outgoing, route.send_counts, route.recv_counts, group, name)
