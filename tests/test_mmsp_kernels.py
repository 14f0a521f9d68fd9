"""Local block kernels: (out, lse) and the backward fed merged row statistics are exact.

Reference: float64 attention by autograd (explicit softmax) on the whole key range of a row.
Each kernel computes the row in two key blocks whose partial results are merged by log-sum-exp,
and each block's backward gets the merged output and lse, as the ring does; the sum of the block
gradients must equal the reference gradients. Tolerance: 1e-5 absolute (fp32).

Packed rows: the rectangle plan of a block (:mod:`rectangles`) and a whole ring of zigzag or
contiguous shards run on one process (``simulated_ring_attention``) against the math kernel with
the explicit ``[s, s]`` segment mask, 1e-5 (fp32), on odd layouts.

GPU adapters: on CPU through stand-ins for flash-attn 2.6.3 / 2.8.3 and Transformer Engine 2.8.0 /
2.20.2 whose entry points have the real parameter lists (``gpu_library_fakes``), against the math
kernel on the same fp16 inputs (5e-3: one fp16 rounding of the outputs). Real GPU runs are in
``tests/test_gpu_check.py``.
"""

from __future__ import annotations

import gpu_library_fakes
import pytest
import torch

from megatron_longvila.core.sequence_parallel import gpu_kernels, kernels
from megatron_longvila.core.sequence_parallel.kernels import merge_by_lse
from megatron_longvila.core.sequence_parallel.rectangles import (
    Rectangle,
    plan_rectangles,
    segment_runs,
)
from megatron_longvila.core.sequence_parallel.ring import block_plan, simulated_ring_attention

pytestmark = pytest.mark.usefixtures("one_thread")
TOLERANCE = 1e-5


def _reference(q, k, v, allowed, dout):
    """float64 attention over ``allowed`` [b, sq, sk]; rows allowed nothing give 0."""
    q, k, v = (t.double().requires_grad_() for t in (q, k, v))
    repeat = q.shape[2] // k.shape[2]
    kr, vr = k.repeat_interleave(repeat, 2), v.repeat_interleave(repeat, 2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, kr) * q.shape[-1] ** -0.5
    scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    out = torch.einsum("bhqk,bkhd->bqhd", probs, vr)
    return (out.detach(), *torch.autograd.grad(out, (q, k, v), dout.double()))


def _two_block_run(q, k, v, dout, *, causal, mask, backend, monkeypatch):
    """Row attention as two key blocks merged by lse; backward per block with merged stats."""
    monkeypatch.setenv("MLV_ATTENTION_BACKEND", backend)
    scale = q.shape[-1] ** -0.5
    s = k.shape[1]
    half = s // 2
    # Causal over a square block splits into the causal diagonal halves and one full block.
    if causal:
        blocks = [
            (slice(0, half), slice(0, half), True),
            (slice(half, s), slice(0, half), False),
            (slice(half, s), slice(half, s), True),
        ]
    else:
        blocks = [(slice(None), slice(0, half), False), (slice(None), slice(half, s), False)]
    out = torch.zeros(q.shape)
    lse = torch.full((q.shape[0], q.shape[2], q.shape[1]), float("-inf"))
    for qs, ks, diagonal in blocks:
        block_out, block_lse = kernels.block_forward(
            q[:, qs],
            k[:, ks],
            v[:, ks],
            scale=scale,
            causal=diagonal and mask is None,
            mask=_block_mask(mask, qs, ks, diagonal),
        )
        out[:, qs], lse[:, :, qs] = merge_by_lse(out[:, qs], lse[:, :, qs], block_out, block_lse)
    dq, dk, dv = torch.zeros(q.shape), torch.zeros(k.shape), torch.zeros(v.shape)
    for qs, ks, diagonal in blocks:
        gq, gk, gv = kernels.block_backward(
            dout[:, qs],
            q[:, qs],
            k[:, ks],
            v[:, ks],
            out[:, qs],
            lse[:, :, qs],
            scale=scale,
            causal=diagonal and mask is None,
            mask=_block_mask(mask, qs, ks, diagonal),
        )
        dq[:, qs] += gq
        dk[:, ks] += gk
        dv[:, ks] += gv
    return out, lse, dq, dk, dv


def _block_mask(mask, qs, ks, diagonal):
    """The block's part of an explicit mask (and causal within a diagonal block), or None."""
    if mask is None:
        return None
    block = mask[:, qs, ks]
    return block & torch.ones(block.shape[1:], dtype=torch.bool).tril() if diagonal else block


@pytest.mark.parametrize("backend", ["cpu_flash", "math"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_blocks_merged_by_lse_equal_whole_row(monkeypatch, backend, causal, kv_heads):
    gen = torch.Generator().manual_seed(kv_heads + 10 * causal)
    b, s, h, d = 2, 12, 4, 8
    q = torch.randn(b, s, h, d, generator=gen)
    k, v = (torch.randn(b, s, kv_heads, d, generator=gen) for _ in range(2))
    dout = torch.randn(b, s, h, d, generator=gen)
    allowed = torch.ones(b, s, s, dtype=torch.bool)
    if causal:
        allowed &= torch.ones(s, s, dtype=torch.bool).tril()
    want = _reference(q, k, v, allowed, dout)
    out, _, *grads = _two_block_run(
        q, k, v, dout, causal=causal, mask=None, backend=backend, monkeypatch=monkeypatch
    )
    for got, ref in zip((out, *grads), want):
        assert (got - ref).abs().max() <= TOLERANCE


def test_rows_that_see_nothing_give_zero_and_no_nan(monkeypatch):
    """Explicit mask with padding rows (segment -1): out 0, lse -inf, zero gradients."""
    gen = torch.Generator().manual_seed(3)
    b, s, h, d = 1, 8, 2, 4
    q, k, v, dout = (torch.randn(b, s, h, d, generator=gen) for _ in range(4))
    segments = torch.tensor([[0, 0, 0, 1, 1, -1, -1, -1]])
    mask = (segments[:, :, None] == segments[:, None, :]) & (segments[:, :, None] >= 0)
    want = _reference(q, k, v, mask, dout)
    out, lse, *grads = _two_block_run(
        q, k, v, dout, causal=False, mask=mask, backend="math", monkeypatch=monkeypatch
    )
    assert not any(t.isnan().any() for t in (out, *grads))
    assert torch.isneginf(lse[..., 5:]).all() and torch.isfinite(lse[..., :5]).all()
    assert (out[:, 5:] == 0).all()
    for got, ref in zip((out, *grads), want):
        assert (got - ref).abs().max() <= TOLERANCE


def test_merge_by_lse_keeps_empty_rows_empty():
    out = torch.zeros(1, 2, 1, 3)
    lse = torch.full((1, 1, 2), float("-inf"))
    block_out = torch.ones(1, 2, 1, 3)
    block_lse = torch.tensor([[[0.5, float("-inf")]]])
    merged, merged_lse = merge_by_lse(out, lse, block_out, block_lse)
    assert torch.equal(merged[:, 0], block_out[:, 0]) and (merged[:, 1] == 0).all()
    assert merged_lse[0, 0, 0] == 0.5 and torch.isneginf(merged_lse[0, 0, 1])


def test_backend_selection_is_one_place(monkeypatch):
    q = torch.zeros(1, 2, 1, 4)
    monkeypatch.delenv("MLV_ATTENTION_BACKEND", raising=False)
    assert kernels.select_backend(q) == "cpu_flash"
    assert kernels.select_backend(q, torch.ones(1, 2, 2, dtype=torch.bool)) == "math"
    monkeypatch.setenv("MLV_ATTENTION_BACKEND", "math")
    assert kernels.select_backend(q) == "math"
    monkeypatch.setenv("MLV_ATTENTION_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="nonsense"):
        kernels.select_backend(q)


def test_a_causal_block_must_be_square():
    """Kernels align a non-square causal mask differently (top-left in TE and PyTorch,
    bottom-right in flash-attn): such a block is refused; rectangles are square when causal."""
    q, k = torch.zeros(1, 4, 2, 8), torch.zeros(1, 6, 2, 8)
    with pytest.raises(ValueError, match="top-left"):
        kernels.block_forward(q, k, k, scale=1.0, causal=True)
    segments = torch.tensor([[0, 0, 1, 1, 1, 2, 2, -1, 3, 3, 0, 0]])
    plan = plan_rectangles(segments, segments, causal=True)
    assert all(r.q_len == r.k_len and r.q_start == r.k_start for r in plan.rectangles if r.causal)


def test_block_plan_zigzag_and_contiguous():
    # zigzag over 4 ranks, 6 tokens per rank (chunks of 3): rank 2 vs an earlier and a later rank.
    assert block_plan("zigzag", True, 2, 2, 6) == (slice(None), slice(None), True)
    assert block_plan("zigzag", True, 2, 0, 6) == (slice(None), slice(0, 3), False)
    assert block_plan("zigzag", True, 2, 3, 6) == (slice(3, None), slice(None), False)
    assert block_plan("contiguous", True, 2, 3, 6) is None
    assert block_plan("contiguous", True, 2, 1, 6) == (slice(None), slice(None), False)
    assert block_plan("zigzag", False, 2, 3, 6) == (slice(None), slice(None), False)


@pytest.mark.parametrize("kind", ["causal", "segments", "full"])
def test_math_kernel_in_pieces_of_query_rows_is_exact(monkeypatch, kind):
    """The math kernel bounds its scores to MATH_QUERY_ROWS query rows at a time: pieces of 3
    rows (the last one shorter) against the float64 reference, GQA 4 → 2 heads."""
    monkeypatch.setattr(kernels, "MATH_QUERY_ROWS", 3)
    gen = torch.Generator().manual_seed(5)
    b, s, h, d = 2, 11, 4, 8
    q, dout = (torch.randn(b, s, h, d, generator=gen) for _ in range(2))
    k, v = (torch.randn(b, s, 2, d, generator=gen) for _ in range(2))
    segments = torch.tensor([[0] * 4 + [1] * 5 + [-1] * 2, [0] * 7 + [1] * 4])
    mask = {
        "causal": None,
        "segments": (segments[:, :, None] == segments[:, None, :]) & (segments[:, :, None] >= 0),
        "full": None,
    }[kind]
    causal = kind == "causal"
    allowed = torch.ones(b, s, s, dtype=torch.bool) if mask is None else mask
    if causal:
        allowed = allowed & torch.ones(s, s, dtype=torch.bool).tril()
    monkeypatch.setenv("MLV_ATTENTION_BACKEND", "math")
    scale = d**-0.5
    out, lse = kernels.block_forward(q, k, v, scale=scale, causal=causal, mask=mask)
    grads = kernels.block_backward(dout, q, k, v, out, lse, scale=scale, causal=causal, mask=mask)
    for got, ref in zip((out, *grads), _reference(q, k, v, allowed, dout)):
        assert (got - ref).abs().max() <= TOLERANCE


# --------------------------------------------------------------------------------------------
# Packed rows: rectangles instead of masks
# --------------------------------------------------------------------------------------------


def test_segment_runs_skip_padding_and_keep_length_one_runs():
    segments = torch.tensor([[3, 3, 7, 1, 1, 1, -1, -1], [0, 0, 0, 0, 0, 0, 0, 0]])
    assert segment_runs(segments) == [[(3, 0, 2), (7, 2, 3), (1, 3, 6)], [(0, 0, 8)]]


def test_rectangles_of_a_causal_diagonal_block_and_of_an_earlier_block():
    segments = torch.tensor([[0, 0, 1, 2, 2, 2, 0, -1]])  # id 0 again after 1 and 2
    diagonal = plan_rectangles(segments, segments, causal=True).rectangles
    assert diagonal == (
        Rectangle(0, 0, 2, 0, 2, True),
        Rectangle(0, 2, 3, 2, 3, True),  # a segment of one token
        Rectangle(0, 3, 6, 3, 6, True),
        Rectangle(0, 6, 7, 0, 2, False),  # the reused id sees its earlier stretch, unmasked
        Rectangle(0, 6, 7, 6, 7, True),
    )
    # An earlier block (keys all precede the queries) of other lengths: unmasked, sq != sk.
    earlier = plan_rectangles(segments[:, 4:], torch.tensor([[5, 2, 2, -1]]), causal=False)
    assert earlier.rectangles == (Rectangle(0, 0, 2, 1, 3, False),)
    assert earlier.pairs == 4 and not earlier.empty
    assert plan_rectangles(segments[:, 7:], segments[:, 7:], causal=True).empty  # padding only
    with pytest.raises(ValueError, match="themselves"):
        plan_rectangles(segments, segments.flip(1), causal=True)


def test_passes_group_rectangles_with_disjoint_query_rows():
    segments = torch.tensor([[0, 0, 1, 2, 2, 2, 0, -1], [4, 4, 4, 4, 5, 5, 5, 5]])
    plan = plan_rectangles(segments, segments, causal=True)
    for group in plan.passes:
        assert len({r.causal for r in group}) == 1
        rows = [(r.row, q) for r in group for q in range(r.q_start, r.q_stop)]
        assert len(rows) == len(set(rows))
    assert sorted(map(str, (r for g in plan.passes for r in g))) == sorted(
        map(str, plan.rectangles)
    )
    assert len(plan.passes) == 2  # all causal squares in one call, the reused id's part in one


def _masked_math(q, k, v, dout, causal, segments):
    """Whole-sequence math kernel with the explicit [b, S, S] mask: out, lse, dq, dk, dv."""
    seq = q.shape[1]
    allowed = torch.ones(q.shape[0], seq, seq, dtype=torch.bool)
    if causal:
        allowed &= torch.ones(seq, seq, dtype=torch.bool).tril()
    if segments is not None:
        allowed &= (segments[:, :, None] == segments[:, None, :]) & (segments[:, :, None] >= 0)
    scale = q.shape[-1] ** -0.5
    out, lse = kernels._math_forward(q, k, v, scale, False, allowed)
    return (out, lse, *kernels._math_backward(dout, q, k, v, out, lse, scale, False, allowed))


def _close(got, want, tolerance):
    """Max abs difference of (out, lse, dq, dk, dv); lse compared where finite (both -inf at
    rows that attend to nothing)."""
    errors = []
    for i, (g, w) in enumerate(zip(got, want)):
        if i == 1:
            finite = torch.isfinite(w)
            assert torch.equal(finite, torch.isfinite(g)), "rows that attend nothing differ"
            g, w = g[finite], w[finite]
        errors.append((g.float() - w.float()).abs().max().item() if w.numel() else 0.0)
    assert max(errors) <= tolerance, errors


# b = 2 rows of 48 tokens. Zigzag over R = 4 cuts them into 8 chunks of 6.
ODD_LAYOUTS = {
    "crossing-chunks": [[0] * 5 + [1] * 30 + [2] + [3] * 8 + [-1] * 4, [0] * 13 + [1] * 35],
    "one-segment": [[0] * 48, [9] * 48],
    "length-one-and-padding": [[0] + [1] * 6 + [2] + [3] * 22 + [-1] * 18, [4] * 47 + [-1]],
    "reused-id": [[0] * 10 + [1] * 10 + [0] * 10 + [2] * 18, [5] * 20 + [-1] * 28],
}


@pytest.mark.parametrize("layout", ["zigzag", "contiguous"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_packed_ring_over_rectangles_equals_masked_math(causal, layout):
    """Every ring size 1, 2, 4 and every odd layout: the ring's block plan over rectangles on
    the CPU flash kernel equals the math kernel with the whole [s, s] mask."""
    gen = torch.Generator().manual_seed(7 + causal)
    b, s, h, d = 2, 48, 4, 8
    q, dout = (torch.randn(b, s, h, d, generator=gen) for _ in range(2))
    k, v = (torch.randn(b, s, 2, d, generator=gen) for _ in range(2))
    for name, rows in ODD_LAYOUTS.items():
        segments = torch.tensor(rows)
        want = _masked_math(q, k, v, dout, causal, segments)
        for ring in (1, 2, 4):
            with kernels.counting_flops() as flops:
                got = simulated_ring_attention(
                    q, k, v, ring, dout=dout, causal=causal, layout=layout, segment_ids=segments
                )
            _close(got, want, TOLERANCE)
            if name == "one-segment" and causal:  # nothing skipped, nothing counted twice
                assert flops.forward == 4 * d * h * b * s * (s + 1) // 2, (ring, layout)


# --------------------------------------------------------------------------------------------
# GPU adapters, on stand-ins for the libraries
# --------------------------------------------------------------------------------------------

LIBRARIES = [("flash_attn", v) for v in gpu_library_fakes.FLASH_VERSIONS] + [
    ("te_fused", v) for v in gpu_library_fakes.TE_VERSIONS
]
HALF_TOLERANCE = 5e-3


def _block_inputs(b, sq, sk, h, hkv, d, dtype=torch.float16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q, dout = (torch.randn(b, sq, h, d, generator=gen).to(dtype) for _ in range(2))
    k, v = (torch.randn(b, sk, hkv, d, generator=gen).to(dtype) for _ in range(2))
    return q, k, v, dout


def _forced(monkeypatch, backend, fn, *args):
    monkeypatch.setenv("MLV_ATTENTION_BACKEND", backend)
    try:
        return fn(*args)
    finally:
        monkeypatch.delenv("MLV_ATTENTION_BACKEND")


def _dense_run(q, k, v, dout, causal, scale=0.3):
    out, lse = kernels.block_forward(q, k, v, scale=scale, causal=causal)
    return out, lse, *kernels.block_backward(dout, q, k, v, out, lse, scale=scale, causal=causal)


def _rectangles_run(q, k, v, dout, plan, scale=0.3):
    out, lse = kernels.rectangles_forward(q, k, v, plan, scale=scale)
    return out, lse, *kernels.rectangles_backward(dout, q, k, v, out, lse, plan, scale=scale)


@pytest.mark.parametrize("library", LIBRARIES, ids=lambda x: f"{x[0]}-{x[1]}")
def test_gpu_adapters_match_math_on_library_stand_ins(monkeypatch, library):
    """Dense blocks (causal, unmasked GQA 8:2, unmasked sq != sk) and packed rectangles (thd /
    varlen calls), out/lse/dq/dk/dv, against the math kernel on the same fp16 inputs."""
    backend = gpu_library_fakes.install(monkeypatch, *library)
    for causal, sq, sk, hkv in [(True, 16, 16, 4), (False, 16, 16, 2), (False, 8, 24, 2)]:
        inputs = _block_inputs(2, sq, sk, 8, hkv, 16)
        got = _forced(monkeypatch, backend, _dense_run, *inputs, causal)
        want = _forced(monkeypatch, "math", _dense_run, *inputs, causal)
        for g, w in zip(got, want):
            assert g.dtype == w.dtype and g.shape == w.shape
        _close(got, want, HALF_TOLERANCE)

    segments = torch.tensor(ODD_LAYOUTS["length-one-and-padding"])[:, :32]
    inputs = _block_inputs(2, 32, 32, 8, 2, 16)
    for causal in (True, False):
        plan = plan_rectangles(segments, segments, causal=causal)
        got = _forced(monkeypatch, backend, _rectangles_run, *inputs, plan)
        want = _forced(monkeypatch, "math", _rectangles_run, *inputs, plan)
        _close(got, want, HALF_TOLERANCE)


def test_a_te_call_without_its_layout_arguments_is_caught(monkeypatch):
    """TE 2.15+ defaults o_format/dqkv_layout to sbhd: the pre-2.15 call (no o_format, with
    dqkv_dtype) gets an [s, b, h, d] output, which the shape check names, and the backward is
    refused rather than called without dqkv_dtype's replacements."""
    backend = gpu_library_fakes.install(monkeypatch, "te_fused", "2.20.2")
    monkeypatch.setattr(gpu_kernels, "te_version", lambda: (2, 14))
    q, k, v, dout = _block_inputs(2, 16, 16, 4, 4, 16)
    monkeypatch.setenv("MLV_ATTENTION_BACKEND", backend)
    with pytest.raises(RuntimeError, match=r"te_fused fused_attn_fwd: out came back \(16, 2,"):
        kernels.block_forward(q, k, v, scale=0.25, causal=True)
    lse = torch.zeros(2, 4, 16)
    with pytest.raises(TypeError, match="dqkv_dtype"):
        kernels.block_backward(dout, q, k, v, q, lse, scale=0.25, causal=True)


def test_call_with_accepted_refuses_to_drop_arguments():
    def old(q, window_size, softmax_scale):
        return window_size, softmax_scale

    def new(q, window_size_left, window_size_right, softmax_scale):
        return window_size_left, window_size_right

    windows = [{"window_size_left": -1, "window_size_right": 0}, {"window_size": (-1, 0)}]
    call = gpu_kernels.call_with_accepted
    assert call(old, {"q": 0, "softmax_scale": 1.0}, windows) == ((-1, 0), 1.0)
    assert call(new, {"q": 0, "softmax_scale": 1.0}, windows) == (-1, 0)
    assert call(gpu_library_fakes._CustomOp(new), {"q": 0, "softmax_scale": 1}, windows) == (-1, 0)
    with pytest.raises(TypeError, match=r"does not take \['attn_mask_type'\]"):
        call(new, {"q": 0, "softmax_scale": 1.0, "attn_mask_type": "causal"}, windows)
    with pytest.raises(TypeError, match="takes none of"):
        call(new, {"q": 0, "softmax_scale": 1.0}, [{"window_size": (-1, 0)}])


def test_a_forced_backend_that_cannot_run_the_block_says_why(monkeypatch):
    q = torch.zeros(1, 4, 2, 12)
    monkeypatch.setenv("MLV_ATTENTION_BACKEND", "flash_attn")
    with pytest.raises(
        ValueError, match=r"flash_attn .*not installed.*float32, head_dim 12, device"
    ):
        kernels.select_backend(q)
    gpu_library_fakes.install(monkeypatch, "flash_attn", "2.8.3")
    with pytest.raises(ValueError, match="float16/bfloat16 only"):
        kernels.select_backend(q)
    with pytest.raises(ValueError, match=r"multiple of 8 .*head_dim 12"):
        kernels.select_backend(q.half())
    with pytest.raises(ValueError, match="only math runs arbitrary masks"):
        kernels.select_backend(q.half()[..., :8], torch.ones(1, 4, 4, dtype=torch.bool))
    monkeypatch.setenv("MLV_ATTENTION_BACKEND", "te_fused")
    with pytest.raises(ValueError, match="te_fused transformer_engine is not installed"):
        kernels.select_backend(q.half()[..., :8])
    # Chosen automatically, a head dim no GPU kernel takes falls through to the next backend.
    monkeypatch.delenv("MLV_ATTENTION_BACKEND")
    assert kernels.select_backend(q.half()[..., :8]) == "flash_attn"
    assert kernels.select_backend(q.half()) == "cpu_flash"


def test_available_backends_is_cached():
    kernels.available_backends.cache_clear()
    first = kernels.available_backends()
    assert kernels.available_backends() is first
    assert kernels.available_backends.cache_info().hits >= 1
