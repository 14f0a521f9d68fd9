"""Shared fixtures: pools of gloo ranks, started once per session and per world size."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterator

import pytest
import torch

from megatron_longvila.core.rank_pool import RankPool

# Each rank imports torch + megatron-core (~0.5 GB, a few seconds): keep two pool sizes alive.
_MAX_LIVE_POOLS = 2


@pytest.fixture(scope="session")
def rank_pools() -> Iterator[Callable[[int], RankPool]]:
    pools: OrderedDict[int, RankPool] = OrderedDict()

    def get(world_size: int) -> RankPool:
        if world_size in pools:
            pools.move_to_end(world_size)
            return pools[world_size]
        while len(pools) >= _MAX_LIVE_POOLS:
            _, oldest = pools.popitem(last=False)
            oldest.close()
        pools[world_size] = RankPool(world_size)
        return pools[world_size]

    yield get
    for pool in pools.values():
        pool.close()


def _pool_fixture(world_size: int):
    @pytest.fixture
    def fixture(rank_pools: Callable[[int], RankPool]) -> RankPool:
        return rank_pools(world_size)

    return fixture


ranks2 = _pool_fixture(2)
ranks4 = _pool_fixture(4)
ranks8 = _pool_fixture(8)


@pytest.fixture
def one_thread() -> Iterator[None]:
    """One intra-op thread for tests of many tiny ops: on a shared machine the threads' hand-offs
    cost far more than they compute (measured 30× slower with two on two loaded cores)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
