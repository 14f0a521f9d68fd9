"""Packed rows without masks: the rectangles of a block where a segment meets itself.

A packed row holds several samples; ``segments: [b, s]`` gives each token's sample (any id
``< 0`` is padding, which attends to nothing and is attended by nothing). Query token ``i`` may
attend key token ``j`` only when both carry the same id (and, under causal attention, ``j`` does
not follow ``i``). For one block — the query part ``q_segments: [b, sq]`` of a rank against one
key/value block ``k_segments: [b, sk]`` — :func:`plan_rectangles` lists the pieces where that
holds, each a dense kernel call:

* **unmasked** rectangles: a query run against a key run of the same id that lies wholly before
  it (or any same-id pair when the attention is not causal); ``sq != sk`` is normal here;
* **causal** squares: a run against itself on the diagonal of a causal block, where query ``i``
  sees keys ``≤ i``. They are square, so "top-left" and "bottom-right" alignment — which kernels
  disagree on when ``sq != sk`` — coincide.

Pairs of different ids and padding produce nothing. The plan costs ``O(b·(sq + sk))`` (one
run-length pass per side) plus ``O(rectangles)``; no ``[sq, sk]`` tensor is ever built.

Why token order is enough, without positions: a causal block here (ring :func:`~.ring.block_plan`
``diagonal``) pairs a rank's tokens with themselves, and a rank's tokens are ordered as in the
global sequence (zigzag chunk ``r`` precedes chunk ``2R−1−r``, also after the Ulysses exchange),
so "key ``j`` does not follow query ``i``" is "``j ≤ i``" in local index. A segment that crosses
from one zigzag chunk into the other is then one local run and one causal square. Off-diagonal
blocks hold keys that all precede (or all follow, skipped by the block plan) the queries.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from functools import cached_property

import torch


@dataclass(frozen=True)
class Rectangle:
    """Queries ``q_start:q_stop`` of batch row ``row`` against keys ``k_start:k_stop``;
    ``causal``: a square on the diagonal (query ``i`` sees keys ``≤ i``), else unmasked."""

    row: int
    q_start: int
    q_stop: int
    k_start: int
    k_stop: int
    causal: bool

    @property
    def q_len(self) -> int:
        return self.q_stop - self.q_start

    @property
    def k_len(self) -> int:
        return self.k_stop - self.k_start

    @property
    def pairs(self) -> int:
        """Attended (query, key) pairs."""
        n = self.q_len
        return n * (n + 1) // 2 if self.causal else n * self.k_len


@dataclass(frozen=True)
class RectanglePlan:
    """The rectangles of one block of ``batch`` rows, ``sq`` queries and ``sk`` keys."""

    batch: int
    sq: int
    sk: int
    rectangles: tuple[Rectangle, ...]

    @property
    def empty(self) -> bool:
        return not self.rectangles

    @property
    def pairs(self) -> int:
        return sum(r.pairs for r in self.rectangles)

    @cached_property
    def passes(self) -> tuple[tuple[Rectangle, ...], ...]:
        """The rectangles in groups of one kind (causal or not) whose query rows do not overlap,
        so that each group is one variable-length kernel call whose outputs scatter back
        without merging. Usually one group per kind; a query run meets several key runs only
        when an id is reused for separate stretches of a row."""
        groups: list[list[Rectangle]] = []
        for rect in sorted(self.rectangles, key=lambda r: (r.causal, r.row, r.q_start)):
            for group in groups:
                last = group[-1]
                if last.causal == rect.causal and (
                    last.row < rect.row or last.q_stop <= rect.q_start
                ):
                    group.append(rect)
                    break
            else:
                groups.append([rect])
        return tuple(tuple(g) for g in groups)


def segment_runs(segments: torch.Tensor) -> list[list[tuple[int, int, int]]]:
    """Per row of ``segments: [b, s]``, the runs ``(id, start, stop)`` of equal ids, padding
    (ids < 0) left out. One pass over the ids on the host."""
    ids = segments.detach().to("cpu", torch.long)
    b, s = ids.shape
    if s == 0:
        return [[] for _ in range(b)]
    starts = torch.ones(b, s, dtype=torch.bool)
    starts[:, 1:] = ids[:, 1:] != ids[:, :-1]
    rows, cols = starts.nonzero(as_tuple=True)
    values = ids[rows, cols]
    runs: list[list[tuple[int, int, int]]] = [[] for _ in range(b)]
    rows, cols, values = rows.tolist(), cols.tolist(), values.tolist()
    for i, (row, start, value) in enumerate(zip(rows, cols, values)):
        stop = cols[i + 1] if i + 1 < len(rows) and rows[i + 1] == row else s
        if value >= 0:
            runs[row].append((value, start, stop))
    return runs


def plan_rectangles(
    q_segments: torch.Tensor, k_segments: torch.Tensor, *, causal: bool
) -> RectanglePlan:
    """The rectangles of one block: ``q_segments: [b, sq]``, ``k_segments: [b, sk]``.

    ``causal=True`` is the diagonal block of causal attention: the queries and keys are the same
    tokens in sequence order (so ``q_segments`` equals ``k_segments``); each run then meets
    itself as a causal square, and earlier runs of the same id unmasked.
    """
    if q_segments.dim() != 2 or k_segments.dim() != 2 or q_segments.shape[0] != k_segments.shape[0]:
        raise ValueError(
            f"segment ids must be [b, sq] and [b, sk]; got {tuple(q_segments.shape)} and "
            f"{tuple(k_segments.shape)}"
        )
    if causal and not torch.equal(q_segments, k_segments):
        raise ValueError(
            "a causal block pairs a rank's tokens with themselves: its query and key segment ids "
            f"must be equal (got shapes {tuple(q_segments.shape)}, {tuple(k_segments.shape)})"
        )
    q_runs = segment_runs(q_segments)
    k_runs = q_runs if causal else segment_runs(k_segments)
    rectangles = []
    for row, (queries, keys) in enumerate(zip(q_runs, k_runs)):
        keys_by_id: dict[int, list[tuple[int, int]]] = defaultdict(list)
        for value, start, stop in keys:
            keys_by_id[value].append((start, stop))
        for value, q_start, q_stop in queries:
            for k_start, k_stop in keys_by_id.get(value, ()):
                if not causal:
                    rectangles.append(Rectangle(row, q_start, q_stop, k_start, k_stop, False))
                elif k_start == q_start:  # the run itself: the causal diagonal
                    rectangles.append(Rectangle(row, q_start, q_stop, k_start, k_stop, True))
                elif k_stop <= q_start:  # an earlier stretch of the same id: wholly visible
                    rectangles.append(Rectangle(row, q_start, q_stop, k_start, k_stop, False))
                # a later stretch of the same id is wholly in the future: nothing
    b, sq = q_segments.shape
    return RectanglePlan(b, sq, k_segments.shape[1], tuple(rectangles))
