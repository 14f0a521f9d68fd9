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

Packed sequences add segment ids (``[b, s]``, ``-1`` = padding): the ring's ids are all-gathered
once per call (the bytes one hop of each block's ids would take), and each step's block is split
into the rectangles where a segment meets itself (:mod:`.rectangles`), planned once in the forward
and reused by the backward. No mask is built; each rectangle runs on the fast kernel.

The backward is a ring too: K/V go round once more, each rank adds its queries' dK/dV to the
accumulator travelling with the block (fp32), and after ``R`` hops every accumulator is home.
Each block's backward is fed the merged output and lse of the whole row, which makes it exact.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron_longvila.core.parallel_state import group_rank, group_size
from megatron_longvila.core.sequence_parallel import comm_stats, kernels
from megatron_longvila.core.sequence_parallel.kernels import merge_by_lse
from megatron_longvila.core.sequence_parallel.rectangles import RectanglePlan, plan_rectangles
from megatron_longvila.core.sequence_parallel.sharding import check_layout, shard_token_indices

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


@dataclass(frozen=True)
class _Step:
    """What one ring step computes: this rank's queries ``qs`` against keys ``ks`` of the block it
    holds, causal on the diagonal, over ``rectangles`` when the rows are packed."""

    qs: slice
    ks: slice
    diagonal: bool
    rectangles: RectanglePlan | None


def _ring_steps(
    held_segments: torch.Tensor | None,
    rank: int,
    ring: int,
    layout: str,
    causal: bool,
    tokens: int,
) -> list[_Step | None]:
    """The steps of rank ``rank``'s ring (None: nothing to compute). ``held_segments``:
    ``[R, b, tokens]`` the segment ids of every ring rank's shard (host tensor), or None for
    unpacked rows; each block's rectangles are planned here, once per call."""
    steps: list[_Step | None] = []
    for step in range(ring):
        source = (rank - step) % ring
        plan = block_plan(layout, causal, rank, source, tokens)
        if plan is None:
            steps.append(None)
            continue
        qs, ks, diagonal = plan
        rectangles = None
        if held_segments is not None:
            rectangles = plan_rectangles(
                held_segments[rank][:, qs], held_segments[source][:, ks], causal=diagonal
            )
            if rectangles.empty:  # no segment of ours meets one of the block's
                steps.append(None)
                continue
        steps.append(_Step(qs, ks, diagonal, rectangles))
    return steps


def _step_forward(step: _Step, q, kv, scale):
    args = (q[:, step.qs], kv[0][:, step.ks], kv[1][:, step.ks])
    if step.rectangles is not None:
        return kernels.rectangles_forward(*args, step.rectangles, scale=scale)
    return kernels.block_forward(*args, scale=scale, causal=step.diagonal)


def _step_backward(step: _Step, dout, q, kv, out, lse, scale):
    qs, ks = step.qs, step.ks
    args = (dout[:, qs], q[:, qs], kv[0][:, ks], kv[1][:, ks], out[:, qs], lse[:, :, qs])
    if step.rectangles is not None:
        return kernels.rectangles_backward(*args, step.rectangles, scale=scale)
    return kernels.block_backward(*args, scale=scale, causal=step.diagonal)


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, segments, group, layout, causal, scale):
        ring = group_size(group)
        b, tokens, heads, _ = q.shape
        held = None
        if segments is not None:
            gathered = comm_stats.all_gather(segments, group, "ring") if ring > 1 else [segments]
            held = torch.stack(gathered).cpu()  # plans are made on the host: one copy, one sync
        steps = _ring_steps(held, group_rank(group), ring, layout, causal, tokens)
        out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        lse = torch.full((b, heads, tokens), float("-inf"), dtype=torch.float32, device=q.device)
        kv = torch.stack([k, v])
        for index, step in enumerate(steps):
            transfer = None
            if index < ring - 1:
                transfer = comm_stats.RingExchange([kv], group, "ring", "p2p_kv", tag=0)
            if step is not None:
                block_out, block_lse = _step_forward(step, q, kv, scale)
                qs = step.qs
                out[:, qs], lse[:, :, qs] = merge_by_lse(
                    out[:, qs], lse[:, :, qs], block_out, block_lse
                )
            if transfer is not None:
                (kv,) = transfer.wait()

        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.steps, ctx.group, ctx.scale = steps, group, scale
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse = ctx.saved_tensors
        group = ctx.group
        ring = group_size(group)
        dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        kv = torch.stack([k, v])
        dkv = torch.zeros(kv.shape, dtype=torch.float32, device=kv.device)
        dkv_transfer = None
        for index, step in enumerate(ctx.steps):
            kv_transfer = None
            if index < ring - 1:
                kv_transfer = comm_stats.RingExchange([kv], group, "ring", "p2p_kv", tag=0)
            if step is not None:
                dq_block, dk_block, dv_block = _step_backward(
                    step, dout, q, kv, out, lse, ctx.scale
                )
                dq[:, step.qs] += dq_block
            # The accumulator of the block we now hold arrives from the previous rank (it left
            # there at the end of the last step, overlapping this step's compute).
            if dkv_transfer is not None:
                (dkv,) = dkv_transfer.wait()
            if step is not None:
                dkv[0][:, step.ks] += dk_block
                dkv[1][:, step.ks] += dv_block
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


def simulated_ring_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    ring: int,
    *,
    dout: torch.Tensor | None = None,
    causal: bool = True,
    layout: str = "zigzag",
    scale: float | None = None,
    segment_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, ...]:
    """All ``ring`` ranks of :func:`ring_attention` run one after another on one device: the
    same steps (block plan, rectangles, merge by lse, each block's backward fed the merged
    output and lse), without communication. For checking kernels against one whole call.

    q: [b, S, hq, d], k/v: [b, S, hkv, d], segment_ids: [b, S] — the whole (padded) sequence in
    its natural order. Returns ``(out [b, S, hq, d], lse [b, hq, S])`` and, given ``dout``,
    ``(dq, dk, dv)`` after them, all float32.
    """
    check_layout(layout)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    seq, device = q.shape[1], q.device
    shards = [shard_token_indices(seq, ring, r, layout, device=device) for r in range(ring)]
    held = None
    if segment_ids is not None:
        held = torch.stack([segment_ids[:, index] for index in shards]).cpu()
    out = torch.zeros(q.shape, dtype=torch.float32, device=device)
    lse = torch.full((q.shape[0], q.shape[2], seq), float("-inf"), device=device)
    grads = [torch.zeros(t.shape, dtype=torch.float32, device=device) for t in (q, k, v)]
    for rank, index in enumerate(shards):
        steps = _ring_steps(held, rank, ring, layout, causal, len(index))
        blocks = [
            torch.stack([k[:, shards[(rank - i) % ring]], v[:, shards[(rank - i) % ring]]])
            for i in range(ring)
        ]
        q_rank = q[:, index]
        out_rank = torch.zeros(q_rank.shape, dtype=torch.float32, device=device)
        lse_rank = lse[:, :, index]
        for step, kv in zip(steps, blocks):
            if step is not None:
                block_out, block_lse = _step_forward(step, q_rank, kv, scale)
                qs = step.qs
                out_rank[:, qs], lse_rank[:, :, qs] = merge_by_lse(
                    out_rank[:, qs], lse_rank[:, :, qs], block_out, block_lse
                )
        out[:, index], lse[:, :, index] = out_rank, lse_rank
        if dout is None:
            continue
        out_rank = out_rank.to(q.dtype)  # what ring_attention saves for its backward
        for i, (step, kv) in enumerate(zip(steps, blocks)):
            if step is not None:
                source = shards[(rank - i) % ring]
                dq, dk, dv = _step_backward(
                    step, dout[:, index], q_rank, kv, out_rank, lse_rank, scale
                )
                grads[0][:, index[step.qs]] += dq
                grads[1][:, source[step.ks]] += dk
                grads[2][:, source[step.ks]] += dv
    return (out, lse) if dout is None else (out, lse, *grads)
