"""comm_stats counts the collectives other code issues on named groups, exactly, and only once.

Reference: the bytes each rank sends, worked out by hand in the test for every collective
(ring all-reduce ``2(n−1)/n``, all-gather ``(n−1)`` copies, reduce-scatter ``(n−1)/n``, broadcast
``(n−1)`` copies from the root), on 4 gloo ranks. Tolerance: exact.
"""

from __future__ import annotations

FLOATS = 10  # 40 bytes per fp32 tensor


def run_collectives() -> dict[str, int]:
    """Collectives straight on torch.distributed (as megatron-core issues them) and one through
    a comm_stats wrapper, inside ``counting`` with two named groups."""
    import torch
    import torch.distributed as dist

    from megatron_longvila.core.sequence_parallel import comm_stats

    rank = dist.get_rank()
    pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    unnamed = dist.new_group([0, 1, 2, 3])
    pair, world = pairs[rank // 2], dist.group.WORLD
    x = torch.ones(FLOATS)
    with comm_stats.counting({"pair": pair, "world": world}) as stats:
        dist.all_reduce(x, group=pair)
        dist.all_gather_into_tensor(torch.empty(2 * FLOATS), x, group=pair)
        dist.reduce_scatter_tensor(torch.empty(FLOATS // 2), x, group=pair)
        dist.broadcast(x, src=0, group=world)
        dist.barrier(group=world)
        dist.all_reduce(x, group=unnamed)  # not a watched group
        comm_stats.all_reduce_sum(x, world, "wrapped")  # counts itself, once
    return stats.as_dict()


def test_counts_collectives_on_named_groups_once(ranks4):
    results = ranks4.run(run_collectives)
    nbytes = 4 * FLOATS
    for rank, counted in enumerate(results):
        assert counted == {
            "pair/allreduce": 2 * nbytes * 1 // 2,
            "pair/allgather_base": nbytes * 1,
            "pair/reduce_scatter_base": nbytes * 1 // 2,
            "world/broadcast": 3 * nbytes if rank == 0 else 0,
            "world/barrier": 0,
            "wrapped/all_reduce": 2 * nbytes * 3 // 4,
        }, rank
