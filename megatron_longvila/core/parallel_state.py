"""The process groups of the MM-SP topology (:mod:`.topology`), built by megatron-core.

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

from megatron_longvila.core.topology import MMSPTopology


def group_size(group: dist.ProcessGroup | None) -> int:
    """Ranks in ``group``; ``None`` stands for a group of one."""
    return 1 if group is None else dist.get_world_size(group)


def group_rank(group: dist.ProcessGroup | None) -> int:
    """This rank's index in ``group``; 0 in a group of one (``None``)."""
    return 0 if group is None else dist.get_rank(group)


@dataclass(frozen=True)
class MMSPGroups:
    """The process groups the MM-SP attention runs on; ``None`` stands for a group of one.

    Within ``sp``, rank ``ulysses_rank + ulysses_size · ring_rank`` (Ulysses innermost).
    """

    sp: Any = None
    ulysses: Any = None
    ring: Any = None

    @property
    def sp_size(self) -> int:
        return group_size(self.sp)

    @property
    def ulysses_size(self) -> int:
        return group_size(self.ulysses)

    @property
    def ring_size(self) -> int:
        return group_size(self.ring)

    @property
    def sp_rank(self) -> int:
        return group_rank(self.sp)

    @property
    def ulysses_rank(self) -> int:
        return group_rank(self.ulysses)

    @property
    def ring_rank(self) -> int:
        return group_rank(self.ring)

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
