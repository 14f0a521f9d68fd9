"""Local block kernels: (out, lse) and the backward fed merged row statistics are exact.

Reference: float64 attention by autograd (explicit softmax) on the whole key range of a row.
Each kernel computes the row in two key blocks whose partial results are merged by log-sum-exp,
and each block's backward gets the merged output and lse, as the ring does; the sum of the block
gradients must equal the reference gradients. Tolerance: 1e-5 absolute (fp32); GPU kernels in
bf16 against the fp32 math kernel, 2e-2.
"""

from __future__ import annotations

import pytest
import torch

from megatron_longvila.core.sequence_parallel import kernels
from megatron_longvila.core.sequence_parallel.ring import block_plan, merge_by_lse

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
    assert kernels.select_backend(q, None) == "cpu_flash"
    assert kernels.select_backend(q, torch.ones(1, 2, 2, dtype=torch.bool)) == "math"
    monkeypatch.setenv("MLV_ATTENTION_BACKEND", "math")
    assert kernels.select_backend(q, None) == "math"
    monkeypatch.setenv("MLV_ATTENTION_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="nonsense"):
        kernels.select_backend(q, None)


def test_block_plan_zigzag_and_contiguous():
    # zigzag over 4 ranks, 6 tokens per rank (chunks of 3): rank 2 vs an earlier and a later rank.
    assert block_plan("zigzag", True, 2, 2, 6) == (slice(None), slice(None), True)
    assert block_plan("zigzag", True, 2, 0, 6) == (slice(None), slice(0, 3), False)
    assert block_plan("zigzag", True, 2, 3, 6) == (slice(3, None), slice(None), False)
    assert block_plan("contiguous", True, 2, 3, 6) is None
    assert block_plan("contiguous", True, 2, 1, 6) == (slice(None), slice(None), False)
    assert block_plan("zigzag", False, 2, 3, 6) == (slice(None), slice(None), False)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("backend", ["flash_attn", "te_fused"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_gpu_kernels_match_math(monkeypatch, backend, causal):
    if backend not in kernels.available_backends():
        pytest.skip(f"{backend} is not installed")
    gen = torch.Generator(device="cuda").manual_seed(0)
    b, s, h, g, d = 2, 256, 8, 2, 64
    q = torch.randn(b, s, h, d, device="cuda", generator=gen)
    k, v = (torch.randn(b, s, g, d, device="cuda", generator=gen) for _ in range(2))
    dout = torch.randn(b, s, h, d, device="cuda", generator=gen)
    results = {}
    for name, dtype in ((backend, torch.bfloat16), ("math", torch.float32)):
        monkeypatch.setenv("MLV_ATTENTION_BACKEND", name)
        args = [t.to(dtype) for t in (q, k, v)]
        out, lse = kernels.block_forward(*args, scale=d**-0.5, causal=causal)
        grads = kernels.block_backward(
            dout.to(dtype), *args, out, lse, scale=d**-0.5, causal=causal
        )
        results[name] = [t.float() for t in (out, lse, *grads)]
    for got, ref in zip(results[backend], results["math"]):
        assert (got - ref).abs().max() <= 2e-2


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
