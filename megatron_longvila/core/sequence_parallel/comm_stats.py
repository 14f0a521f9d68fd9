"""Every collective and p2p transfer of MM-SP, and an exact count of the bytes each one sends.

All communication of the sequence-parallel code goes through the wrappers below
(:func:`all_to_all`, :func:`all_to_all_v`, :func:`all_gather`, :func:`all_reduce_sum`,
:class:`RingExchange`), each tagged with the name of the group it runs on (``"ulysses"``,
``"ring"``, ``"sp"``). Inside :func:`counting` they add the bytes this rank *sends to other
ranks* to a :class:`CommStats`; outside it they count nothing. Bytes a rank keeps for itself (its
own chunk of an all-to-all) are not counted; an all-gather counts ``(n−1)`` copies of the local
tensor, an all-reduce the ``2(n−1)/n`` of a ring all-reduce.

The same numbers in closed form, for any size, are in :mod:`.traffic`; tests compare the two.

Traffic that other code issues (megatron-core's tensor-parallel layers, its DDP gradient
reduction) goes straight to ``torch.distributed``. ``counting(other_groups={"tp": tp_group, ...})``
counts that too: it watches the ``c10d`` ops at the dispatcher and books those on the named
groups under the given names, with the per-collective rules of :mod:`.traffic`. Transfers of the
wrappers above are never counted twice.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

from megatron_longvila.core.parallel_state import group_rank, group_size
from megatron_longvila.core.sequence_parallel.traffic import (
    all_gather_bytes,
    all_reduce_bytes,
    all_to_all_bytes,
    reduce_scatter_bytes,
)

# --------------------------------------------------------------------------------------------
# Counting
# --------------------------------------------------------------------------------------------


@dataclass
class CommStats:
    """Bytes sent and number of calls by this rank, keyed by ``(group name, op)``."""

    sent_bytes: dict[tuple[str, str], int] = field(default_factory=lambda: defaultdict(int))
    calls: dict[tuple[str, str], int] = field(default_factory=lambda: defaultdict(int))

    def record(self, group: str, op: str, nbytes: int) -> None:
        self.sent_bytes[(group, op)] += int(nbytes)
        self.calls[(group, op)] += 1

    def bytes(self, group: str | None = None, op: str | None = None) -> int:
        """Total bytes sent, optionally restricted to one group name and/or one op."""
        return sum(
            n
            for (g, o), n in self.sent_bytes.items()
            if (group is None or g == group) and (op is None or o == op)
        )

    def as_dict(self) -> dict[str, int]:
        """``{"group/op": bytes}``, plain types for JSON and for returning from ranks."""
        return {f"{g}/{o}": n for (g, o), n in sorted(self.sent_bytes.items())}


_active: list[CommStats] = []


@contextlib.contextmanager
def counting(
    other_groups: Mapping[str, dist.ProcessGroup | None] | None = None,
) -> Iterator[CommStats]:
    """Count the bytes of every MM-SP transfer issued inside the block (nesting counts in both).

    ``other_groups`` (name → group): also count the collectives any other code runs on these
    groups (megatron-core's tensor-parallel all-reduces, DDP's gradient reduction), booked under
    the name. ``None`` groups (size one) are skipped.
    """
    stats = CommStats()
    _active.append(stats)
    watched = {name: g for name, g in (other_groups or {}).items() if g is not None}
    watcher = _CollectiveWatcher(stats, watched) if watched else contextlib.nullcontext()
    try:
        with watcher:
            yield stats
    finally:
        _active.remove(stats)


def _record(group: str, op: str, nbytes: int) -> None:
    for stats in _active:
        stats.record(group, op, nbytes)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


# --------------------------------------------------------------------------------------------
# Collectives of other code, seen at the dispatcher
# --------------------------------------------------------------------------------------------

_own_transfers = 0  # > 0 while a wrapper below talks to torch.distributed (it counts itself)


@contextlib.contextmanager
def _own_transfer() -> Iterator[None]:
    global _own_transfers
    _own_transfers += 1
    try:
        yield
    finally:
        _own_transfers -= 1


def _list_bytes(tensors: Any) -> int:
    if isinstance(tensors, torch.Tensor):
        return _nbytes(tensors)
    return sum(_list_bytes(t) for t in tensors)


def _rule(rule, tensors_arg: int):
    """Bytes of a c10d op: ``rule`` applied to each tensor of argument ``tensors_arg``."""

    def count(args, n, rank):
        item = args[tensors_arg]
        tensors = [item] if isinstance(item, torch.Tensor) else list(item)
        return sum(rule(_list_bytes(t), n) for t in tensors)

    return count


def _broadcast_bytes(args, n, rank):
    # broadcast_(tensors, group, root_rank, ...): the root sends its tensors to the n−1 others.
    return _list_bytes(args[0]) * (n - 1) if args[2] == rank else 0


def _no_bytes(args, n, rank):
    return 0


# c10d op → bytes this rank sends. The argument positions are those of the c10d op schemas.
_C10D_BYTES = {
    "allreduce_": _rule(all_reduce_bytes, 0),
    "allreduce_coalesced_": _rule(all_reduce_bytes, 0),
    "_allgather_base_": _rule(all_gather_bytes, 1),
    "allgather_": _rule(all_gather_bytes, 1),
    "allgather_coalesced_": _rule(all_gather_bytes, 1),
    "allgather_into_tensor_coalesced_": _rule(all_gather_bytes, 1),
    "_reduce_scatter_base_": _rule(reduce_scatter_bytes, 1),
    "reduce_scatter_tensor_coalesced_": _rule(reduce_scatter_bytes, 1),
    "alltoall_base_": _rule(all_to_all_bytes, 1),
    "send": lambda args, n, rank: _list_bytes(args[0]),
    "broadcast_": _broadcast_bytes,
    "recv_": _no_bytes,
    "recv_any_source_": _no_bytes,
    "barrier": _no_bytes,
    "monitored_barrier_": _no_bytes,
}
_PROCESS_GROUP_TYPE = "__torch__.torch.classes.c10d.ProcessGroup"


class _CollectiveWatcher(TorchDispatchMode):
    """Books the bytes of ``c10d`` ops issued on the watched groups (see :func:`counting`)."""

    def __init__(self, stats: CommStats, groups: Mapping[str, dist.ProcessGroup]) -> None:
        super().__init__()
        self.stats = stats
        self.groups = list(groups.items())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "c10d" and not _own_transfers:
            self._book(func, args)
        return func(*args, **(kwargs or {}))

    def _book(self, func, args) -> None:
        group = next(
            (
                dist.ProcessGroup.unbox(a)
                for a in args
                if isinstance(a, torch.ScriptObject)
                and a._type().qualified_name() == _PROCESS_GROUP_TYPE
            ),
            None,
        )
        name = next((name for name, g in self.groups if g is group), None)
        if name is None:
            return
        op = func._opname
        if op not in _C10D_BYTES:
            raise NotImplementedError(f"comm_stats cannot count the bytes of c10d op {op!r}")
        nbytes = _C10D_BYTES[op](args, group.size(), group.rank())
        self.stats.record(name, op.strip("_"), nbytes)


# --------------------------------------------------------------------------------------------
# The transfers
# --------------------------------------------------------------------------------------------


def all_to_all(x: torch.Tensor, group: dist.ProcessGroup, name: str) -> torch.Tensor:
    """Equal-split all-to-all along dim 0: chunk ``j`` of ``x`` goes to rank ``j``.

    x: [n, ...] with ``n`` = group size; returns [n, ...] whose chunk ``j`` came from rank ``j``.
    """
    n = group_size(group)
    if x.shape[0] != n:
        raise ValueError(f"all_to_all on '{name}' needs dim 0 == group size {n}, got {x.shape[0]}")
    x = x.contiguous()
    out = torch.empty_like(x)
    with _own_transfer():
        dist.all_to_all_single(out, x, group=group)
    _record(name, "all_to_all", all_to_all_bytes(_nbytes(x), n))
    return out


def all_to_all_v(
    x: torch.Tensor,
    send_counts: list[int],
    recv_counts: list[int],
    group: dist.ProcessGroup,
    name: str,
) -> torch.Tensor:
    """All-to-all of rows with per-rank counts: rows ``x[sum(send_counts[:j]) : ...]`` go to rank
    ``j``; the result holds ``recv_counts[j]`` rows from each rank ``j``, in group-rank order.

    x: [sum(send_counts), ...]; returns [sum(recv_counts), ...]. Counted: the rows sent to other
    ranks (the rows a rank keeps for itself never travel).
    """
    n, rank = group_size(group), group_rank(group)
    if len(send_counts) != n or len(recv_counts) != n or x.shape[0] != sum(send_counts):
        raise ValueError(
            f"all_to_all_v on '{name}' over {n} ranks: {len(send_counts)} send counts summing to "
            f"{sum(send_counts)}, {len(recv_counts)} receive counts, {x.shape[0]} rows given"
        )
    x = x.contiguous()
    out = x.new_empty((sum(recv_counts), *x.shape[1:]))
    dist.all_to_all_single(
        out, x, output_split_sizes=recv_counts, input_split_sizes=send_counts, group=group
    )
    row_bytes = _nbytes(x[:1]) if x.shape[0] else 0
    _record(name, "all_to_all_v", (sum(send_counts) - send_counts[rank]) * row_bytes)
    return out


def all_gather(x: torch.Tensor, group: dist.ProcessGroup, name: str) -> list[torch.Tensor]:
    """All-gather ``x`` (same shape on every rank); returns the tensors in group-rank order."""
    n = group_size(group)
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(n)]
    with _own_transfer():
        dist.all_gather(parts, x, group=group)
    _record(name, "all_gather", all_gather_bytes(_nbytes(x), n))
    return parts


def all_reduce_sum(x: torch.Tensor, group: dist.ProcessGroup, name: str) -> None:
    """Sum ``x`` in place over ``group``; counted as a ring all-reduce, ``2(n−1)/n`` of ``x``."""
    n = group_size(group)
    with _own_transfer():
        dist.all_reduce(x, group=group)
    _record(name, "all_reduce", all_reduce_bytes(_nbytes(x), n))


class RingExchange:
    """Send tensors to the next rank of a ring and receive the same shapes from the previous one.

    Started at construction (``batch_isend_irecv``), so the caller computes while the transfer
    runs; :meth:`wait` returns the received tensors.
    """

    def __init__(
        self,
        tensors: list[torch.Tensor],
        group: dist.ProcessGroup,
        name: str,
        op: str,
        tag: int = 0,
    ) -> None:
        n, rank = group_size(group), group_rank(group)
        nxt = dist.get_global_rank(group, (rank + 1) % n)
        prv = dist.get_global_rank(group, (rank - 1) % n)
        # Kept alive until wait(): the transfers read from and write into these.
        self._sent = [t.contiguous() for t in tensors]
        self.received = [torch.empty_like(t) for t in self._sent]
        ops = []
        # Every rank posts the same sequence; distinct tags keep two exchanges in flight at once
        # (K/V of the next step beside dK/dV of the last) from matching each other's messages.
        for t, r in zip(self._sent, self.received):
            ops.append(dist.P2POp(dist.isend, t, nxt, group, tag))
            ops.append(dist.P2POp(dist.irecv, r, prv, group, tag))
            _record(name, op, _nbytes(t))
        with _own_transfer():
            self._requests = dist.batch_isend_irecv(ops)

    def wait(self) -> list[torch.Tensor]:
        with _own_transfer():
            for request in self._requests:
                request.wait()
        return self.received
