"""The MM-SP topology ``tp × sp × dp × pp`` with ``sp = ulysses × ring``, built by megatron-core.

Rank order, innermost first: tensor parallel, Ulysses (contiguous, so a ``tp × ulysses`` block sits
in one node and the all-to-all stays on NVLink), ring (hops cross nodes), data parallel, pipeline.
``sp`` occupies the slot megatron-core calls context parallelism (CP), so mcore's gradient
reduction over ``dp × cp``, its optimizer and its checkpoint sharding see the sequence-parallel
ranks for what they are; Ulysses and ring are mcore's hierarchical CP levels 0 and 1. Global rank::

    rank = tp_rank + tp·(ulysses_rank + ulysses·ring_rank) + tp·sp·dp_rank + tp·sp·dp·pp_rank

Call :func:`initialize_mmsp` once after ``torch.distributed`` is up; the accessors below then
return the groups, and :func:`get_mmsp_groups` the bundle the attention functions take.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch.distributed as dist
from megatron.core import parallel_state as mcore_parallel_state


@dataclass(frozen=True)
class MMSPTopology:
    """Sizes of the parallel dimensions; ``dp`` follows from the world size."""

    tp: int = 1
    ulysses: int = 1
    ring: int = 1
    pp: int = 1

    def __post_init__(self) -> None:
        for name in ("tp", "ulysses", "ring", "pp"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"MMSPTopology.{name} must be a positive integer, got {value!r}")

    @property
    def sp(self) -> int:
        return self.ulysses * self.ring

    @property
    def model_parallel_size(self) -> int:
        """Ranks per data-parallel replica: ``tp × sp × pp``."""
        return self.tp * self.sp * self.pp

    def dp(self, world_size: int) -> int:
        self.validate(world_size)
        return world_size // self.model_parallel_size

    def validate(
        self,
        world_size: int,
        num_attention_heads: int | None = None,
        num_query_groups: int | None = None,
        seq_length: int | None = None,
    ) -> None:
        """Raise ``ValueError`` naming the numbers if this topology cannot run the model/world."""
        n = self.model_parallel_size
        if world_size % n:
            raise ValueError(
                f"world size {world_size} is not divisible by tp×sp×pp = "
                f"{self.tp}×{self.sp}×{self.pp} = {n} (sp = ulysses×ring = "
                f"{self.ulysses}×{self.ring})"
            )
        if num_attention_heads is not None:
            split = self.tp * self.ulysses
            if num_attention_heads % split:
                raise ValueError(
                    f"num_attention_heads {num_attention_heads} is not divisible by tp×ulysses = "
                    f"{self.tp}×{self.ulysses} = {split}"
                )
        if num_query_groups is not None:
            self._validate_kv_heads(num_query_groups)
        if seq_length is not None and seq_length < 2 * self.sp:
            raise ValueError(
                f"sequence length {seq_length} is shorter than 2×sp = 2×{self.sp} = "
                f"{2 * self.sp}: every sp rank needs two zigzag chunks"
            )

    def _validate_kv_heads(self, num_query_groups: int) -> None:
        if num_query_groups % self.tp:
            raise ValueError(
                f"num_query_groups {num_query_groups} (key/value heads) is not divisible by "
                f"tp {self.tp}"
            )
        per_tp = num_query_groups // self.tp
        if per_tp % self.ulysses and self.ulysses % per_tp:
            raise ValueError(
                f"{per_tp} key/value heads per tensor-parallel rank (num_query_groups "
                f"{num_query_groups} / tp {self.tp}) can neither be split over ulysses="
                f"{self.ulysses} ranks nor replicated onto them: one must divide the other"
            )


@dataclass(frozen=True)
class MMSPGroups:
    """The process groups the MM-SP attention runs on; ``None`` stands for a group of one.

    Within ``sp``, rank ``ulysses_rank + ulysses_size · ring_rank`` (Ulysses innermost).
    """

    sp: Any = None
    ulysses: Any = None
    ring: Any = None

    @staticmethod
    def _size(group: Any) -> int:
        return 1 if group is None else dist.get_world_size(group)

    @staticmethod
    def _rank(group: Any) -> int:
        return 0 if group is None else dist.get_rank(group)

    @property
    def sp_size(self) -> int:
        return self._size(self.sp)

    @property
    def ulysses_size(self) -> int:
        return self._size(self.ulysses)

    @property
    def ring_size(self) -> int:
        return self._size(self.ring)

    @property
    def sp_rank(self) -> int:
        return self._rank(self.sp)

    @property
    def ulysses_rank(self) -> int:
        return self._rank(self.ulysses)

    @property
    def ring_rank(self) -> int:
        return self._rank(self.ring)

    @classmethod
    def from_pg_collection(cls, pg_collection: Any) -> MMSPGroups:
        """From megatron-core's ``ProcessGroupCollection``: ``cp`` is sp, ``hcp`` [ulysses, ring].

        Without hierarchical CP groups the whole CP group is one ring.
        """
        sp = getattr(pg_collection, "cp", None)
        hcp = getattr(pg_collection, "hcp", None)
        if hcp:
            if len(hcp) != 2:
                raise ValueError(
                    f"MM-SP needs two hierarchical context-parallel levels [ulysses, ring], "
                    f"got {len(hcp)}"
                )
            return cls(sp=sp, ulysses=hcp[0], ring=hcp[1])
        return cls(sp=sp, ulysses=None, ring=sp)


def initialize_mmsp(topology: MMSPTopology, **mcore_kwargs: Any) -> MMSPGroups:
    """Build every parallel group with megatron-core for ``topology``; return the MM-SP groups.

    ``mcore_kwargs`` go to ``parallel_state.initialize_model_parallel`` (e.g.
    ``virtual_pipeline_model_parallel_size``); the order stays mcore's default ``tp-cp-ep-dp-pp``.
    The topology lives in megatron-core's state alone: the accessors below read it back from
    there, so there is no second registry to fall out of step.
    """
    if not dist.is_initialized():
        raise RuntimeError("initialize_mmsp needs torch.distributed to be initialized first")
    topology.validate(dist.get_world_size())
    mcore_parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=topology.tp,
        pipeline_model_parallel_size=topology.pp,
        context_parallel_size=topology.sp,
        hierarchical_context_parallel_sizes=[topology.ulysses, topology.ring],
        **mcore_kwargs,
    )
    return get_mmsp_groups()


def mmsp_is_initialized() -> bool:
    return mcore_parallel_state.model_parallel_is_initialized()


def _require_initialized() -> None:
    if not mmsp_is_initialized():
        raise RuntimeError("MM-SP is not initialized: call initialize_mmsp(topology) first")


def get_sp_group():
    _require_initialized()
    return mcore_parallel_state.get_context_parallel_group()


def _levels() -> tuple[Any, Any]:
    """(ulysses, ring) groups; a CP group built without hierarchy is a single ring.

    Levels whose sizes do not multiply to the CP size are stale: megatron-core keeps the
    hierarchical groups of an earlier initialization across ``destroy_model_parallel``, so a
    plain ``initialize_model_parallel`` afterwards must not pick them up.
    """
    _require_initialized()
    sp = get_sp_group()
    levels = mcore_parallel_state.get_hierarchical_context_parallel_groups(check_initialized=False)
    if not levels:
        return None, sp
    try:
        sizes = [dist.get_world_size(group) for group in levels]
    except (RuntimeError, ValueError):  # groups destroyed since
        return None, sp
    if math.prod(sizes) != dist.get_world_size(sp):
        return None, sp
    return levels[0], levels[1]


def get_ulysses_group():
    """The Ulysses group, or ``None`` when megatron-core's CP has no hierarchy (ulysses = 1)."""
    return _levels()[0]


def get_ring_group():
    return _levels()[1]


def get_vision_sharding_group():
    """The ranks over which stage 1 spreads the frames of a batch: the sp group."""
    return get_sp_group()


def get_mmsp_groups() -> MMSPGroups:
    """The groups of this rank; without MM-SP initialized, groups of one (no communication)."""
    if not mmsp_is_initialized():
        return MMSPGroups()
    ulysses, ring = _levels()
    return MMSPGroups(sp=get_sp_group(), ulysses=ulysses, ring=ring)


def get_sp_world_size() -> int:
    return get_mmsp_groups().sp_size


def get_sp_rank() -> int:
    return get_mmsp_groups().sp_rank


def get_ulysses_world_size() -> int:
    return get_mmsp_groups().ulysses_size


def get_ulysses_rank() -> int:
    return get_mmsp_groups().ulysses_rank


def get_ring_world_size() -> int:
    return get_mmsp_groups().ring_size


def get_ring_rank() -> int:
    return get_mmsp_groups().ring_rank


def get_mmsp_topology() -> MMSPTopology:
    """The topology megatron-core was initialized with (read back from its groups)."""
    groups = get_mmsp_groups()
    _require_initialized()
    return MMSPTopology(
        tp=mcore_parallel_state.get_tensor_model_parallel_world_size(),
        ulysses=groups.ulysses_size,
        ring=groups.ring_size,
        pp=mcore_parallel_state.get_pipeline_model_parallel_world_size(),
    )
