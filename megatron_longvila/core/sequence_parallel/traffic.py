"""Bytes each MM-SP transfer sends, in closed form: the formulas the counters in
:mod:`.comm_stats` are tested against, and what the cluster cost model prices.

The analytic counts (per rank, bytes sent; ``e`` = bytes per element of q/k/v, ``e_g`` = bytes per
element of the dK/dV accumulators travelling in the backward ring, ``e_s`` = bytes per segment id;
``b`` batch, ``S`` padded global sequence, ``sp = U × R``, ``H``/``G`` query/key-value heads per
tensor-parallel rank, ``G' = G`` if ``U`` divides ``G`` else ``U`` (kv heads replicated), ``d`` head
dim, ``s = S / sp`` tokens per rank):

* Ulysses, forward (group ``"ulysses"``): all-to-all of q, k, v in, all-to-all of the output back,
  each sending ``(U-1)/U`` of its input::

      ulysses_fwd = (U-1)/U · b·s·d·e · (2H + 2G')  [+ (U-1)·b·s·e_s  all-gather of segment ids]

* Ulysses, backward: the inverse all-to-all of each of those four gradients::

      ulysses_bwd = (U-1)/U · b·s·d·e · (2H + 2G')

* Ring, forward (group ``"ring"``; after Ulysses a rank holds ``S/R = U·s`` tokens and ``G'/U`` kv
  heads): ``R-1`` hops of the K/V block (and an all-gather of the segment ids, the same bytes as
  ``R-1`` hops of them)::

      ring_fwd = (R-1) · (2·b·U·s·(G'/U)·d·e  [+ b·U·s·e_s])

* Ring, backward: ``R-1`` hops of K/V again, and ``R`` hops of the dK/dV accumulators (the last hop
  brings them home)::

      ring_bwd = (R-1) · 2·b·U·s·(G'/U)·d·e  +  R · 2·b·U·s·(G'/U)·d·e_g      (0 when R = 1)

* 2D = the Ulysses terms on the ``"ulysses"`` group plus the ring terms on the ``"ring"`` group.

:func:`ulysses_bytes_per_rank`, :func:`ring_bytes_per_rank` and
:func:`mmsp_attention_bytes_per_rank` compute these numbers.
"""

from __future__ import annotations

from megatron_longvila.core.topology import replicated_kv_heads

# --------------------------------------------------------------------------------------------
# Bytes one rank sends in a collective of ``n`` ranks (shared by the counters and the formulas)
# --------------------------------------------------------------------------------------------


def all_reduce_bytes(nbytes: int, n: int) -> int:
    """Ring all-reduce of a tensor of ``nbytes``: reduce-scatter + all-gather, ``2(n−1)/n``."""
    return 2 * nbytes * (n - 1) // n


def all_gather_bytes(nbytes: int, n: int) -> int:
    """All-gather of a local tensor of ``nbytes``: it reaches the ``n−1`` others."""
    return nbytes * (n - 1)


def reduce_scatter_bytes(nbytes: int, n: int) -> int:
    """Reduce-scatter of an input of ``nbytes``: all but this rank's ``1/n`` leaves."""
    return nbytes * (n - 1) // n


def all_to_all_bytes(nbytes: int, n: int) -> int:
    """Equal-split all-to-all of an input of ``nbytes``: all but this rank's ``1/n`` leaves."""
    return nbytes * (n - 1) // n


# --------------------------------------------------------------------------------------------
# Per attention call (see the module docstring)
# --------------------------------------------------------------------------------------------


def ulysses_bytes_per_rank(
    batch: int,
    tokens_per_rank: int,
    heads: int,
    kv_heads: int,
    head_dim: int,
    ulysses: int,
    itemsize: int,
    segment_itemsize: int = 0,
) -> dict[str, int]:
    """Bytes one rank sends on the Ulysses group: ``{"forward": ..., "backward": ...}``.

    ``heads``/``kv_heads`` are per tensor-parallel rank (before kv replication);
    ``segment_itemsize`` > 0 when segment ids are all-gathered.
    """
    u = ulysses
    kv = replicated_kv_heads(kv_heads, u)
    per_head = batch * tokens_per_rank * head_dim * itemsize
    a2a = (2 * heads + 2 * kv) * per_head * (u - 1) // u
    segments = (u - 1) * batch * tokens_per_rank * segment_itemsize
    return {"forward": a2a + segments, "backward": a2a}


def ring_bytes_per_rank(
    batch: int,
    tokens_per_ring_rank: int,
    kv_heads_per_ring_rank: int,
    head_dim: int,
    ring: int,
    itemsize: int,
    grad_itemsize: int = 4,
    segment_itemsize: int = 0,
) -> dict[str, int]:
    """Bytes one rank sends on the ring group: ``{"forward": ..., "backward": ...}``.

    ``tokens_per_ring_rank`` and ``kv_heads_per_ring_rank`` describe the K/V block a ring rank
    holds (after Ulysses, if any); ``grad_itemsize`` is the dK/dV accumulator's element size.
    """
    r = ring
    elements = 2 * batch * tokens_per_ring_rank * kv_heads_per_ring_rank * head_dim
    segments = batch * tokens_per_ring_rank * segment_itemsize
    forward = (r - 1) * (elements * itemsize + segments)
    backward = (r - 1) * elements * itemsize + (r * elements * grad_itemsize if r > 1 else 0)
    return {"forward": forward, "backward": backward}


def mmsp_attention_bytes_per_rank(
    batch: int,
    seq_len: int,
    heads: int,
    kv_heads: int,
    head_dim: int,
    ulysses: int,
    ring: int,
    itemsize: int,
    grad_itemsize: int = 4,
    segment_itemsize: int = 0,
) -> dict[str, dict[str, int]]:
    """Bytes one rank sends for one 2D attention call, by group.

    Returns ``{"ulysses": {"forward", "backward"}, "ring": {"forward", "backward"}}``;
    ``seq_len`` is the padded global sequence, heads are per tensor-parallel rank.
    """
    sp = ulysses * ring
    if seq_len % sp:
        raise ValueError(f"seq_len {seq_len} is not divisible by sp = {ulysses}×{ring} = {sp}")
    tokens = seq_len // sp
    kv = replicated_kv_heads(kv_heads, ulysses)
    return {
        "ulysses": ulysses_bytes_per_rank(
            batch, tokens, heads, kv_heads, head_dim, ulysses, itemsize, segment_itemsize
        ),
        "ring": ring_bytes_per_rank(
            batch,
            tokens * ulysses,
            kv // ulysses,
            head_dim,
            ring,
            itemsize,
            grad_itemsize,
            segment_itemsize,
        ),
    }
