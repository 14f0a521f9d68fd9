"""The MM-SP topology: bad sizes fail naming the numbers; megatron-core builds the groups in the
documented rank order.

Reference for the groups: the closed formula of the rank order (tp innermost, then ulysses, ring,
dp, pp), ``rank = t + tp·(u + U·r) + tp·sp·d + tp·sp·dp·p``, evaluated here; the groups are the
ones megatron-core's ``initialize_model_parallel`` builds on 8 gloo ranks.
"""

from __future__ import annotations

import itertools

import pytest

from megatron_longvila.core.parallel_state import MMSPTopology

TOPOLOGIES = [
    MMSPTopology(tp=2, ulysses=2, ring=2),
    MMSPTopology(tp=1, ulysses=2, ring=2, pp=2),
    MMSPTopology(tp=2, ulysses=1, ring=2, pp=2),
    MMSPTopology(tp=1, ulysses=4, ring=1),
    MMSPTopology(tp=1, ulysses=1, ring=1),
]


# ---- validation --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "topology, kwargs, message",
    [
        (MMSPTopology(tp=2, ulysses=3), {"world_size": 8}, r"world size 8 .* 2×3×1×1 = 6"),
        (
            MMSPTopology(tp=2, ulysses=4),
            {"world_size": 8, "num_attention_heads": 12},
            r"num_attention_heads 12: .* tp×ulysses = 2×4 = 8",
        ),
        (
            MMSPTopology(tp=2, ulysses=2),
            {"world_size": 8, "num_attention_heads": 8, "num_query_groups": 3},
            r"num_query_groups 3 .* tp 2",
        ),
        (
            MMSPTopology(ulysses=4),
            {"world_size": 8, "num_attention_heads": 12, "num_query_groups": 6},
            r"6 key/value heads .* ulysses=4",
        ),
        (
            MMSPTopology(ulysses=2, ring=4),
            {"world_size": 8, "seq_length": 15},
            r"sequence length 15 .* 2×8 = 16",
        ),
    ],
)
def test_bad_sizes_fail_naming_the_numbers(topology, kwargs, message):
    with pytest.raises(ValueError, match=message):
        topology.validate(**kwargs)


def test_valid_sizes_pass_and_dp_follows_from_the_world():
    # kv heads fewer than ulysses are replicated: 8 query heads, 2 kv heads, tp=2, ulysses=4 → 1
    # kv head per tp rank, replicated onto 4 Ulysses ranks.
    MMSPTopology(tp=2, ulysses=4).validate(16, num_attention_heads=8, num_query_groups=2)
    MMSPTopology(ulysses=2, ring=2).validate(8, num_attention_heads=4, seq_length=8)
    assert MMSPTopology(tp=2, ulysses=2, ring=2).dp(16) == 2
    assert MMSPTopology(ulysses=2, ring=4).sp == 8


@pytest.mark.parametrize("field", ["tp", "ulysses", "ring", "pp"])
def test_sizes_must_be_positive_integers(field):
    with pytest.raises(ValueError, match=f"MMSPTopology.{field}"):
        MMSPTopology(**{field: 0})


# ---- groups built by megatron-core -------------------------------------------------------------


def group_membership(topology: MMSPTopology) -> dict:
    """On every rank: the members of each group megatron-core built for ``topology``."""
    import torch.distributed as dist
    from megatron.core import parallel_state as mcore
    from megatron.core.process_groups_config import ProcessGroupCollection

    from megatron_longvila.core import parallel_state as mmsp

    groups = mmsp.initialize_mmsp(topology)
    members = lambda g: None if g is None else dist.get_process_group_ranks(g)
    from_mcore = mmsp.MMSPGroups.from_pg_collection(ProcessGroupCollection.use_mpu_process_groups())
    return {
        "rank": dist.get_rank(),
        "topology": mmsp.get_mmsp_topology(),
        "tp": members(mcore.get_tensor_model_parallel_group()),
        "pp": members(mcore.get_pipeline_model_parallel_group()),
        "dp": members(mcore.get_data_parallel_group()),
        "dp_sp": members(mcore.get_data_parallel_group(with_context_parallel=True)),
        "sp": members(groups.sp),
        "ulysses": members(groups.ulysses),
        "ring": members(groups.ring),
        "vision": members(mmsp.get_vision_sharding_group()),
        "sp_rank": (mmsp.get_sp_rank(), groups.ulysses_rank, groups.ring_rank),
        "sizes": (
            mmsp.get_sp_world_size(),
            mmsp.get_ulysses_world_size(),
            mmsp.get_ring_world_size(),
        ),
        "pg_collection": (
            members(from_mcore.sp),
            members(from_mcore.ulysses),
            members(from_mcore.ring),
        ),
    }


def _expected_groups(topology: MMSPTopology, world: int) -> dict[int, dict]:
    """Members of each group of every rank, from the documented rank formula."""
    tp, u_size, r_size, pp = topology.tp, topology.ulysses, topology.ring, topology.pp
    sp, dp = topology.sp, world // topology.model_parallel_size
    coords = {}
    for p, d, r, u, t in itertools.product(
        range(pp), range(dp), range(r_size), range(u_size), range(tp)
    ):
        coords[t + tp * (u + u_size * r) + tp * sp * d + tp * sp * dp * p] = (t, u, r, d, p)

    def ranks_where(rank, *free):
        """Ranks sharing every coordinate of ``rank`` except those named in ``free``."""
        names = ("t", "u", "r", "d", "p")
        fixed = [i for i, n in enumerate(names) if n not in free]
        return sorted(q for q, c in coords.items() if all(c[i] == coords[rank][i] for i in fixed))

    return {
        rank: {
            "tp": ranks_where(rank, "t"),
            "pp": ranks_where(rank, "p"),
            "dp": ranks_where(rank, "d"),
            "dp_sp": ranks_where(rank, "d", "u", "r"),
            "sp": ranks_where(rank, "u", "r"),
            "ulysses": ranks_where(rank, "u"),
            "ring": ranks_where(rank, "r"),
            "sp_rank": (
                coords[rank][1] + u_size * coords[rank][2],
                coords[rank][1],
                coords[rank][2],
            ),
        }
        for rank in coords
    }


@pytest.mark.parametrize(
    "topology", TOPOLOGIES, ids=lambda t: f"tp{t.tp}-u{t.ulysses}-r{t.ring}-pp{t.pp}"
)
def test_megatron_core_groups_follow_the_rank_order(rank_pools, topology):
    results = rank_pools(8).run(group_membership, topology)
    expected = _expected_groups(topology, 8)
    for result in results:
        want = expected[result["rank"]]
        assert result["topology"] == topology
        for name in ("tp", "pp", "dp", "dp_sp", "sp", "sp_rank"):
            assert (
                sorted(result[name]) if isinstance(result[name], list) else result[name]
            ) == want[name], (name, result["rank"])
        # Ulysses and ring groups are listed in group-rank order: check membership and order.
        assert result["ulysses"] is None or result["ulysses"] == want["ulysses"]
        assert result["ring"] == want["ring"]
        assert result["vision"] == result["sp"]
        assert result["sizes"] == (topology.sp, topology.ulysses, topology.ring)
        assert result["pg_collection"] == (result["sp"], result["ulysses"], result["ring"])


def test_initialize_refuses_a_world_that_does_not_divide(rank_pools):
    messages = rank_pools(8).run(initialize_error, MMSPTopology(ulysses=3, tp=2))
    for message in messages:
        assert "world size 8 is not divisible by tp×ulysses×ring×pp = 2×3×1×1 = 6" in message


def initialize_error(topology: MMSPTopology) -> str:
    """The error ``initialize_mmsp`` raises for ``topology`` (caught: the pool stays up)."""
    from megatron_longvila.core.parallel_state import initialize_mmsp

    try:
        initialize_mmsp(topology)
    except ValueError as error:
        return str(error)
    return "no error"


def test_uninitialized_state_means_groups_of_one():
    from megatron_longvila.core import parallel_state as mmsp

    groups = mmsp.get_mmsp_groups()
    assert (groups.sp_size, groups.ulysses_size, groups.ring_size) == (1, 1, 1)
    with pytest.raises(RuntimeError, match="initialize_mmsp"):
        mmsp.get_sp_group()


def reinitialize_without_hierarchy() -> tuple:
    """2D MM-SP, destroyed, then megatron-core's own initialization with plain CP."""
    from megatron.core import parallel_state as mcore

    from megatron_longvila.core import parallel_state as mmsp

    mmsp.initialize_mmsp(MMSPTopology(ulysses=2, ring=2))
    mcore.destroy_model_parallel()  # leaves its hierarchical CP groups behind
    mcore.initialize_model_parallel(context_parallel_size=2)
    after_plain = (
        mmsp.get_sp_world_size(),
        mmsp.get_ulysses_world_size(),
        mmsp.get_ring_world_size(),
    )
    mcore.destroy_model_parallel()
    mcore.initialize_model_parallel()
    after_none = (
        mmsp.get_sp_world_size(),
        mmsp.get_ulysses_world_size(),
        mmsp.get_ring_world_size(),
    )
    return after_plain, after_none


def test_stale_hierarchical_groups_of_an_earlier_run_are_ignored(rank_pools):
    for after_plain, after_none in rank_pools(4).run(reinitialize_without_hierarchy):
        assert after_plain == (2, 1, 2)
        assert after_none == (1, 1, 1)
