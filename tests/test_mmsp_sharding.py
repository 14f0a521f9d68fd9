"""Sequence sharding: zigzag is megatron-core's CP split, gathering inverts splitting, padding and
the Ulysses-to-ring reordering hold their invariants.

References: megatron-core's ``get_batch_on_this_cp_rank`` for the zigzag split; the unsplit tensor
for the gather (exact equality); for the gather's backward, the adjoint of an all-gather (each
shard's gradient is the sum over ranks of the gradients at its positions), computed here.
"""

from __future__ import annotations

import pytest
import torch

from megatron_longvila.core.sequence_parallel.hybrid import ring_order_after_ulysses
from megatron_longvila.core.sequence_parallel.sharding import (
    locate_tokens,
    pad_to_multiple,
    shard_token_indices,
    split_sequence,
    split_zigzag,
)


@pytest.mark.parametrize("sp", [1, 2, 4, 8])
def test_split_zigzag_is_megatron_cores_cp_split(monkeypatch, sp):
    from megatron.core import parallel_state
    from megatron.core.utils import get_batch_on_this_cp_rank

    tokens = torch.arange(2 * 32).view(2, 32)
    for rank in range(sp):
        monkeypatch.setattr(parallel_state, "get_context_parallel_world_size", lambda: sp)
        monkeypatch.setattr(parallel_state, "get_context_parallel_rank", lambda r=rank: r)
        expected = get_batch_on_this_cp_rank({"tokens": tokens.clone()})["tokens"]
        assert torch.equal(split_zigzag(tokens, sp, rank), expected)


@pytest.mark.parametrize("layout", ["zigzag", "contiguous"])
def test_shards_partition_the_sequence(layout):
    indices = torch.cat([shard_token_indices(48, 8, r, layout) for r in range(8)])
    assert torch.equal(indices.sort().values, torch.arange(48))


@pytest.mark.parametrize("sp", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("layout", ["zigzag", "contiguous"])
def test_locate_tokens_inverts_shard_token_indices(sp, layout):
    seq = 2 * sp * 5
    for rank in range(sp):
        held = shard_token_indices(seq, sp, rank, layout)
        owner, local = locate_tokens(held, seq, sp, layout)
        assert (owner == rank).all()
        assert torch.equal(local, torch.arange(len(held)))
    with pytest.raises(ValueError, match=rf"positions 0..{seq} must lie in \[0, {seq}\)"):
        locate_tokens(torch.tensor([0, seq]), seq, sp, layout)


def test_pad_to_multiple_and_clear_errors():
    x = torch.ones(2, 45, 3)
    padded = pad_to_multiple(x, 16, dim=1, value=-1)
    assert padded.shape == (2, 48, 3) and (padded[:, 45:] == -1).all()
    assert pad_to_multiple(padded, 16, dim=1) is padded
    with pytest.raises(ValueError, match="45 is not a multiple of 16"):
        split_sequence(x, 8, 0)
    with pytest.raises(ValueError, match="unknown sequence layout 'striped'"):
        split_sequence(padded, 8, 0, layout="striped")


@pytest.mark.parametrize("ulysses, ring", [(2, 4), (4, 2), (8, 1), (2, 2)])
@pytest.mark.parametrize("layout", ["zigzag", "contiguous"])
def test_ulysses_gathered_tokens_are_the_ring_shard(ulysses, ring, layout):
    """After the Ulysses gather, ring rank r holds its ring-level shard (up to the permutation)."""
    seq = 2 * ulysses * ring * 3
    for r in range(ring):
        gathered = torch.cat(
            [
                shard_token_indices(seq, ulysses * ring, u + ulysses * r, layout)
                for u in range(ulysses)
            ]
        )
        order = ring_order_after_ulysses(seq, ulysses, ring, r, layout)
        arranged = gathered if order is None else gathered[order]
        assert torch.equal(arranged, shard_token_indices(seq, ring, r, layout))


def gather_round_trip(layout: str) -> dict:
    """On every rank: gather a shard of a known tensor; backward with rank-dependent weights."""
    import torch.distributed as dist

    from megatron_longvila.core.parallel_state import MMSPTopology, initialize_mmsp
    from megatron_longvila.core.sequence_parallel import comm_stats
    from megatron_longvila.core.sequence_parallel.sharding import gather_sequence

    groups = initialize_mmsp(MMSPTopology(ulysses=2, ring=2))
    sp, rank = groups.sp_size, groups.sp_rank
    full = torch.arange(2 * 16 * 3, dtype=torch.float32).view(2, 16, 3)
    shard = split_sequence(full, sp, rank, layout=layout).requires_grad_()
    with comm_stats.counting() as stats:
        gathered = gather_sequence(shard, groups.sp, layout=layout)
        weights = torch.full_like(gathered, float(rank + 1))
        (gathered * weights).sum().backward()
    # Adjoint of the all-gather: every rank's weight lands on every shard: sum_r (r + 1).
    expected_grad = torch.full_like(shard, float(sum(range(1, sp + 1))))
    return {
        "equal": torch.equal(gathered, full),
        "grad_equal": torch.equal(shard.grad, expected_grad),
        "bytes": stats.as_dict(),
        "shard_bytes": shard.numel() * 4,
        "world": dist.get_world_size(),
    }


@pytest.mark.parametrize("layout", ["zigzag", "contiguous"])
def test_gather_inverts_split_and_its_backward_is_the_adjoint(rank_pools, layout):
    for result in rank_pools(8).run(gather_round_trip, layout):
        assert result["equal"] and result["grad_equal"]
        sp, n = 4, result["shard_bytes"]
        assert result["bytes"] == {
            "sp/all_gather": (sp - 1) * n,
            "sp/all_reduce": 2 * (sp * n) * (sp - 1) // sp,
        }
