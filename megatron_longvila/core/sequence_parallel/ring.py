"""Ring attention: exact attention over a sequence split across the ranks of a ring.

Each of the ``R`` ranks holds the queries, keys and values of its shard (``q: [b, s, hq, d]``,
``k, v: [b, s, hkv, d]``, ``s = S/R``, layout ``"zigzag"`` or ``"contiguous"`` at ring level, see
:mod:`.sharding`). At step ``i`` rank ``r`` holds the K/V block of rank ``r − i``: it starts
sending that block on to ``r + 1`` (batched isend/irecv), computes its queries against it while the
transfer runs, and merges the partial result into its running output by log-sum-exp.

Which part of the queries meets which part of a block (:func:`block_plan`) follows from the
layout, so no mask is built for causal attention: diagonal blocks use the plain causal kernel,
blocks whose keys all precede the queries the unmasked kernel, and fully masked pairs are skipped.
In the zigzag layout every off-diagonal step costs exactly half a block for every rank.

Packed sequences add segment ids (``[b, s]``, ``-1`` = padding): they travel with their K/V
block, and each block then runs with the explicit mask "same segment, not padding (and causal)".

The backward is a ring too: K/V go round once more, each rank adds its queries' dK/dV to the
accumulator travelling with the block (fp32), and after ``R`` hops every accumulator is home.
Each block's backward is fed the merged output and lse of the whole row, which makes it exact.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_longvila.core.parallel_state import group_rank, group_size
from megatron_longvila.core.sequence_parallel import comm_stats, kernels
from megatron_longvila.core.sequence_parallel.sharding import check_layout

Plan = tuple[slice, slice, bool]  # (query slice, key/value slice, causal diagonal block)
_ALL = slice(None)


def block_plan(layout: str, causal: bool, rank: int, source: int, tokens: int) -> Plan | None:
    """How rank ``rank``'s queries meet the K/V block of rank ``source`` (``tokens`` per rank).

    Returns ``None`` when no query may see any key of the block.
    """
    if not causal:
        return _ALL, _ALL, False
    if source == rank:
        return _ALL, _ALL, True
    if layout == "contiguous":
        return (_ALL, _ALL, False) if source < rank else None
    # zigzag: rank r holds chunks r and 2R-1-r. An earlier source's first chunk precedes both of
    # ours and its second follows both; a later source's two chunks both precede our second chunk
    # and follow our first.
    first, second = slice(0, tokens // 2), slice(tokens // 2, None)
    return (_ALL, first, False) if source < rank else (second, _ALL, False)


def _block_mask(
    q_segments: torch.Tensor | None, kv_segments: torch.Tensor | None, plan: Plan
) -> torch.Tensor | None:
    """Explicit mask ``[b, sq, sk]`` for packed sequences (None without segment ids)."""
    if q_segments is None:
        return None
    qs, ks, diagonal = plan
    sq, sk = q_segments[:, qs, None], kv_segments[:, None, ks]
    allowed = (sq == sk) & (sq >= 0)
    if diagonal:
        allowed &= torch.ones(allowed.shape[1:], dtype=torch.bool, device=allowed.device).tril()
    return allowed


def merge_by_lse(
    out: torch.Tensor, lse: torch.Tensor, block_out: torch.Tensor, block_lse: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine two softmax-normalised partial results over disjoint key sets.

    out: [b, s, h, d] fp32, lse: [b, h, s]; rows where both lse are -inf stay (0, -inf).
    """
    new_lse = torch.logaddexp(lse, block_lse)
    finite = new_lse.masked_fill(torch.isneginf(new_lse), 0.0)
    weight_old = torch.exp(lse - finite).transpose(1, 2).unsqueeze(-1)
    weight_new = torch.exp(block_lse - finite).transpose(1, 2).unsqueeze(-1)
    return out * weight_old + block_out.float() * weight_new, new_lse


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, segments, group, layout, causal, scale):
        ring, rank = group_size(group), group_rank(group)
        b, tokens, heads, _ = q.shape
        out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        lse = torch.full((b, heads, tokens), float("-inf"), dtype=torch.float32, device=q.device)
        payload = [torch.stack([k, v])] + ([segments] if segments is not None else [])
        held_segments = []
        for step in range(ring):
            transfer = None
            if step < ring - 1:
                transfer = comm_stats.RingExchange(payload, group, "ring", "p2p_kv", tag=0)
            kv, kv_segments = payload[0], payload[1] if segments is not None else None
            plan = block_plan(layout, causal, rank, (rank - step) % ring, tokens)
            if plan is not None:
                qs, ks, diagonal = plan
                mask = _block_mask(segments, kv_segments, plan)
                block_out, block_lse = kernels.block_forward(
                    q[:, qs],
                    kv[0][:, ks],
                    kv[1][:, ks],
                    scale=scale,
                    causal=diagonal and mask is None,
                    mask=mask,
                )
                out[:, qs], lse[:, :, qs] = merge_by_lse(
                    out[:, qs], lse[:, :, qs], block_out, block_lse
                )
            held_segments.append(kv_segments)
            if transfer is not None:
                payload = transfer.wait()

        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.held_segments, ctx.segments = held_segments, segments
        ctx.group, ctx.layout, ctx.causal, ctx.scale = group, layout, causal, scale
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse = ctx.saved_tensors
        group = ctx.group
        ring, rank = group_size(group), group_rank(group)
        tokens = q.shape[1]
        dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        kv = torch.stack([k, v])
        dkv = torch.zeros(kv.shape, dtype=torch.float32, device=kv.device)
        dkv_transfer = None
        for step in range(ring):
            kv_transfer = None
            if step < ring - 1:
                kv_transfer = comm_stats.RingExchange([kv], group, "ring", "p2p_kv", tag=0)
            plan = block_plan(ctx.layout, ctx.causal, rank, (rank - step) % ring, tokens)
            if plan is not None:
                qs, ks, diagonal = plan
                mask = _block_mask(ctx.segments, ctx.held_segments[step], plan)
                dq_block, dk_block, dv_block = kernels.block_backward(
                    dout[:, qs],
                    q[:, qs],
                    kv[0][:, ks],
                    kv[1][:, ks],
                    out[:, qs],
                    lse[:, :, qs],
                    scale=ctx.scale,
                    causal=diagonal and mask is None,
                    mask=mask,
                )
                dq[:, qs] += dq_block
            # The accumulator of the block we now hold arrives from the previous rank (it left
            # there at the end of the last step, overlapping this step's compute).
            if dkv_transfer is not None:
                (dkv,) = dkv_transfer.wait()
            if plan is not None:
                dkv[0][:, ks] += dk_block
                dkv[1][:, ks] += dv_block
            if ring > 1:
                dkv_transfer = comm_stats.RingExchange([dkv], group, "ring", "p2p_dkv", tag=1)
            if kv_transfer is not None:
                (kv,) = kv_transfer.wait()
        if dkv_transfer is not None:
            (dkv,) = dkv_transfer.wait()  # the R-th hop brings our own block's gradients home
        return dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype), None, None, None, None, None


def ring_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    group: dist.ProcessGroup | None,
    *,
    causal: bool = True,
    layout: str = "zigzag",
    scale: float | None = None,
    segment_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact attention of this rank's queries over the keys of the whole ring.

    q: [b, s, hq, d], k/v: [b, s, hkv, d] (this rank's shard in ``layout`` over the ring),
    segment_ids: [b, s] or None. Returns ``(out [b, s, hq, d], lse [b, hq, s] fp32)``; ``lse``
    carries no gradient.
    """
    check_layout(layout)
    if causal and layout == "zigzag" and q.shape[1] % 2:
        raise ValueError(f"zigzag shards hold two equal chunks; got {q.shape[1]} tokens")
    if scale is None:
        scale = q.shape[-1] ** -0.5
    return _RingAttention.apply(q, k, v, segment_ids, group, layout, causal, scale)
