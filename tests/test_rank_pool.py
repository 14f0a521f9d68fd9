"""The rank pool: results in rank order, first failure with its traceback, time-outs, restart."""

from __future__ import annotations

import time

import pytest
import torch

from megatron_longvila.core.rank_pool import RankFailure, RankTimeout


def _rank_and_sum():
    rank = torch.distributed.get_rank()
    value = torch.tensor([float(rank + 1)])
    torch.distributed.all_reduce(value)
    return rank, float(value)


def _fail_on(bad_rank: int):
    if torch.distributed.get_rank() == bad_rank:
        raise ValueError(f"planted failure on rank {bad_rank}")
    return "fine"


def _sleep(seconds: float):
    time.sleep(seconds)


def test_results_in_rank_order_with_real_collectives(ranks2):
    assert ranks2.run(_rank_and_sum) == [(0, 3.0), (1, 3.0)]


def test_failure_carries_rank_and_traceback_then_pool_restarts(ranks2):
    with pytest.raises(RankFailure) as info:
        ranks2.run(_fail_on, 1)
    message = str(info.value)
    assert "rank 1 of 2" in message
    assert "planted failure on rank 1" in message and "Traceback" in message
    assert ranks2.run(_rank_and_sum) == [(0, 3.0), (1, 3.0)]


def test_hang_times_out_naming_the_ranks(ranks2):
    with pytest.raises(RankTimeout, match=r"rank\(s\) \[0, 1\] of 2 did not finish within 2s"):
        ranks2.run(_sleep, 60, timeout_s=2)
    assert ranks2.run(_rank_and_sum)[1] == (1, 3.0)


def test_start_retries_when_the_port_is_taken(monkeypatch):
    import socket

    from megatron_longvila.core import rank_pool

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    ports = iter([taken.getsockname()[1]])
    real_free_port = rank_pool.free_port
    monkeypatch.setattr(rank_pool, "free_port", lambda: next(ports, None) or real_free_port())
    try:
        with rank_pool.RankPool(2) as pool:
            assert pool.run(_rank_and_sum) == [(0, 3.0), (1, 3.0)]
    finally:
        taken.close()
