"""MM-SP attention equals single-process attention, moves the bytes the formulas say, and balances
causal work under the zigzag layout.

Reference: ``torch.nn.functional.scaled_dot_product_attention`` in float64 on the full, unsplit,
unpadded sequence with an explicit boolean mask (causal and/or same-segment), GQA by repeating
kv heads, gradients by autograd — one process, no sequence parallelism.
Tolerance: 1e-5 absolute on the output and on dq/dk/dv (our run is fp32).

Every ``ulysses × ring`` split of sp ∈ {1, 2, 4, 8} runs on 8 gloo ranks (``8 / sp`` data-parallel
replicas) through ``initialize_mmsp``; one pool call per split runs all cases and returns errors,
byte counts and FLOPs, and the assertions happen here.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

from megatron_longvila.core.sequence_parallel import comm_stats, traffic

TOLERANCE = 1e-5
BATCH, HEADS, HEAD_DIM = 2, 8, 8
SPLITS = [(1, 1), (1, 2), (2, 1), (1, 4), (2, 2), (4, 1), (1, 8), (2, 4), (4, 2), (8, 1)]


@dataclass(frozen=True)
class Case:
    name: str
    causal: bool
    layout: str
    kv_heads: int
    length: int  # real tokens; the sequence is padded to a multiple of the layout's unit
    segments: tuple[int, ...] | None  # packed sample lengths (sum <= length), or None


CASES = (
    Case("causal", True, "zigzag", 8, 48, None),
    Case("full-gqa2", False, "zigzag", 2, 48, None),
    Case("causal-gqa1-packed3-padded", True, "zigzag", 1, 45, (19, 11, 15)),
    Case("causal-contiguous-gqa2", True, "contiguous", 2, 48, None),
    Case("full-contiguous-packed3", False, "contiguous", 8, 48, (20, 11, 17)),
    Case("causal-padded", True, "zigzag", 4, 45, None),
    Case("full-padded", False, "zigzag", 8, 45, (45,)),
)


def _segment_ids(case: Case, padded: int) -> torch.Tensor | None:
    """[b, padded]: sample index per token, -1 at padding; None when the case has no segments."""
    if case.segments is None:
        return None
    ids = torch.cat([torch.full((n,), i) for i, n in enumerate(case.segments)])
    ids = torch.cat([ids, torch.full((padded - len(ids),), -1)])
    return ids.expand(BATCH, padded).clone()


def _reference(q, k, v, dout, case: Case, segment_ids):
    """Output and dq/dk/dv of plain attention on the real (unpadded) tokens, float64."""
    n = case.length
    q, k, v = (t[:, :n].double().requires_grad_() for t in (q, k, v))
    allowed = torch.ones(BATCH, n, n, dtype=torch.bool)
    if case.causal:
        allowed &= torch.ones(n, n, dtype=torch.bool).tril()
    if segment_ids is not None:
        seg = segment_ids[:, :n]
        allowed &= seg[:, :, None] == seg[:, None, :]
    repeat = HEADS // case.kv_heads
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2),
        k.repeat_interleave(repeat, 2).transpose(1, 2),
        v.repeat_interleave(repeat, 2).transpose(1, 2),
        attn_mask=allowed[:, None],
    ).transpose(1, 2)
    grads = torch.autograd.grad(out, (q, k, v), dout[:, :n].double())
    return (out.detach(), *grads)


def run_split(ulysses: int, ring: int) -> list[dict]:
    """On every rank: each case through mmsp_attention; errors vs the reference, bytes, FLOPs."""
    from megatron_longvila.core.parallel_state import MMSPTopology, initialize_mmsp
    from megatron_longvila.core.sequence_parallel import kernels
    from megatron_longvila.core.sequence_parallel.attention import mmsp_attention
    from megatron_longvila.core.sequence_parallel.sharding import (
        pad_to_multiple,
        sequence_multiple,
        split_sequence,
    )

    groups = initialize_mmsp(MMSPTopology(ulysses=ulysses, ring=ring))
    sp, sp_rank = groups.sp_size, groups.sp_rank
    results = []
    for index, case in enumerate(CASES):
        gen = torch.Generator().manual_seed(1000 + index)
        padded = case.length + (-case.length % sequence_multiple(sp, case.layout))
        shape_q = (BATCH, padded, HEADS, HEAD_DIM)
        shape_kv = (BATCH, padded, case.kv_heads, HEAD_DIM)
        q = torch.randn(shape_q, generator=gen)
        k, v = torch.randn(shape_kv, generator=gen), torch.randn(shape_kv, generator=gen)
        # Padding carries no loss: its output gradient is zero, as a masked loss makes it.
        dout = pad_to_multiple(torch.randn(shape_q, generator=gen)[:, : case.length], padded)
        segment_ids = _segment_ids(case, padded)
        reference = [
            pad_to_multiple(t.float(), padded) for t in _reference(q, k, v, dout, case, segment_ids)
        ]

        def local(t, dim=1, layout=case.layout):
            return split_sequence(t, sp, sp_rank, dim=dim, layout=layout)

        ql, kl, vl = (local(t).requires_grad_() for t in (q, k, v))
        local_segments = None if segment_ids is None else local(segment_ids)
        with comm_stats.counting() as forward_bytes, kernels.counting_flops() as flops:
            out = mmsp_attention(
                ql,
                kl,
                vl,
                causal=case.causal,
                segment_ids=local_segments,
                groups=groups,
                layout=case.layout,
            )
        with comm_stats.counting() as backward_bytes:
            out.backward(local(dout))

        real = local(torch.arange(padded) < case.length, dim=0)
        errors = {
            "out": (out - local(reference[0]))[:, real].abs().max().item(),
            "dq": (ql.grad - local(reference[1])).abs().max().item(),
            "dk": (kl.grad - local(reference[2])).abs().max().item(),
            "dv": (vl.grad - local(reference[3])).abs().max().item(),
        }
        if local_segments is not None:  # padding attends to nothing: exactly zero, never NaN
            padding = local_segments < 0
            errors["out_at_padding"] = out[padding].abs().max().item() if padding.any() else 0.0
        results.append(
            {
                "case": case.name,
                "padded": padded,
                "errors": errors,
                "forward_bytes": {g: forward_bytes.bytes(g) for g in ("ulysses", "ring")},
                "backward_bytes": {g: backward_bytes.bytes(g) for g in ("ulysses", "ring")},
                "flops": flops.forward,
            }
        )
    return results


@pytest.fixture(scope="module")
def split_results(rank_pools):
    """{(ulysses, ring): per-rank results}; all splits on one pool of 8 ranks."""
    pool = rank_pools(8)
    return {split: pool.run(run_split, *split) for split in SPLITS}


@pytest.mark.parametrize("split", SPLITS, ids=[f"u{u}xr{r}" for u, r in SPLITS])
def test_output_and_grads_equal_single_process(split_results, split):
    for rank, results in enumerate(split_results[split]):
        for result in results:
            for what, error in result["errors"].items():
                assert error <= TOLERANCE, (split, rank, result["case"], what, error)


@pytest.mark.parametrize("split", SPLITS, ids=[f"u{u}xr{r}" for u, r in SPLITS])
def test_measured_bytes_equal_formulas(split_results, split):
    ulysses, ring = split
    for results in split_results[split]:
        for case, result in zip(CASES, results):
            expected = traffic.mmsp_attention_bytes_per_rank(
                batch=BATCH,
                seq_len=result["padded"],
                heads=HEADS,
                kv_heads=case.kv_heads,
                head_dim=HEAD_DIM,
                ulysses=ulysses,
                ring=ring,
                itemsize=4,
                grad_itemsize=4,
                segment_itemsize=8 if case.segments else 0,
            )
            for group in ("ulysses", "ring"):
                assert result["forward_bytes"][group] == expected[group]["forward"], (case, group)
                assert result["backward_bytes"][group] == expected[group]["backward"], (case, group)
    if ulysses * ring > 1:  # the formulas are not vacuous: something moved
        assert sum(split_results[split][0][0]["forward_bytes"].values()) > 0


def _imbalance(results_per_rank: list[list[dict]], case_name: str) -> float:
    flops = [
        next(r["flops"] for r in results if r["case"] == case_name) for results in results_per_rank
    ]
    return max(flops) / (sum(flops) / len(flops))


@pytest.mark.parametrize("split", [(1, 8), (2, 4), (4, 2), (1, 4)], ids=str)
def test_zigzag_balances_causal_work(split_results, split):
    zigzag = _imbalance(split_results[split], "causal")
    contiguous = _imbalance(split_results[split], "causal-contiguous-gqa2")
    assert zigzag <= 1.01, zigzag
    # Contrast: the contiguous split leaves the last ring rank with most of the work.
    assert contiguous > 1.3, contiguous
