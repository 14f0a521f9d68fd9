"""Local attention kernels for one (query block, key/value block) pair, returning (out, lse).

Ring attention merges partial results by their log-sum-exp, and its backward feeds each block the
*merged* output and lse, so every kernel here exposes both halves:

* :func:`block_forward` ``(q, k, v) -> (out, lse)``
* :func:`block_backward` ``(dout, q, k, v, out, lse) -> (dq, dk, dv)`` with ``out``/``lse`` those
  of the whole row (all blocks merged), which makes the block's gradients exact.
* :func:`rectangles_forward` / :func:`rectangles_backward`: the same for a block of packed rows,
  given its :class:`~.rectangles.RectanglePlan` (the pieces where a segment meets itself): one
  dense kernel call per rectangle, or one variable-length call per group of rectangles on GPUs.

Shapes: ``q: [b, sq, hq, d]``, ``k, v: [b, sk, hkv, d]`` (``hkv`` divides ``hq``; query head ``h``
uses kv head ``h // (hq / hkv)``), ``out: [b, sq, hq, d]``, ``lse: [b, hq, sq]`` float32.
A dense block is unmasked or causal (``sq == sk``, query ``i`` sees keys ``0..i``). The ``math``
kernel also takes an explicit boolean ``mask: [b, sq, sk]`` (True = may attend): the reference
for arbitrary masks, which no fast kernel covers. A query row that may attend to nothing gets
``out = 0`` and ``lse = -inf``, and zero gradients, never NaN.

This module is the one place that chooses a backend (:func:`select_backend`), in this order:

* ``flash_attn``: the flash-attn package (CUDA, fp16/bf16, head dim a multiple of 8 up to 256);
* ``te_fused``: Transformer Engine's fused attention (CUDA, fp16/bf16, cuDNN);
* ``cpu_flash``: PyTorch's CPU flash kernel
  (``aten._scaled_dot_product_flash_attention_for_cpu`` and its backward op);
* ``math``: explicit softmax in fp32 (or fp64), exact; the fallback for everything else.

The GPU adapters live in :mod:`.gpu_kernels`. ``MLV_ATTENTION_BACKEND`` forces a backend (e.g.
``math``) for comparisons; a forced backend that cannot run a block raises, naming the backend,
dtype, head dim and device, rather than handing the block to another one.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from megatron_longvila.core.sequence_parallel import gpu_kernels
from megatron_longvila.core.sequence_parallel.rectangles import Rectangle, RectanglePlan

Tensor = torch.Tensor
BACKENDS = ("flash_attn", "te_fused", "cpu_flash", "math")  # automatic choice: first that fits
GPU_BACKENDS = ("flash_attn", "te_fused")
_GPU_MODULES = {
    "flash_attn": "flash_attn.flash_attn_interface",
    "te_fused": "transformer_engine.pytorch.cpp_extensions.fused_attn",
}
_HALF = (torch.float16, torch.bfloat16)

# --------------------------------------------------------------------------------------------
# Backend selection
# --------------------------------------------------------------------------------------------


def _importable(name: str) -> bool:
    try:
        importlib.import_module(name)
    except Exception:  # not installed, or installed without a usable CUDA build
        return False
    return True


@functools.cache
def available_backends() -> tuple[str, ...]:
    """Backends installed in this process (whether they fit a block is :func:`select_backend`'s
    question). Cached: importing flash-attn or Transformer Engine takes seconds."""
    found = ["cpu_flash", "math"]
    if torch.cuda.is_available():
        found += [name for name in GPU_BACKENDS if _importable(_GPU_MODULES[name])]
    return tuple(found)


def _gpu_capability(t: Tensor) -> tuple[int, int] | None:
    """Compute capability of ``t``'s GPU, None for tensors off CUDA."""
    return torch.cuda.get_device_capability(t.device) if t.is_cuda else None


def _cudnn_version() -> int:
    return torch.backends.cudnn.version() or 0


def _why_not(backend: str, q: Tensor) -> str | None:
    """Why ``backend`` cannot run a block of ``q`` (its device, dtype, head dim), or None."""
    head_dim = q.shape[-1]
    if backend == "math":
        return None if q.is_floating_point() else "needs floating-point tensors"
    if backend == "cpu_flash":
        if q.device.type != "cpu":
            return "runs on CPU tensors only"
        return None if q.is_floating_point() else "needs floating-point tensors"
    if backend not in available_backends():
        return f"{_GPU_MODULES[backend].split('.')[0]} is not installed (or has no CUDA here)"
    capability = _gpu_capability(q)
    if capability is None:
        return "runs on CUDA tensors only"
    if capability < (8, 0):
        return f"needs compute capability 8.0 or newer, this GPU has {capability}"
    if q.dtype not in _HALF:
        return "takes float16/bfloat16 only"
    if head_dim % 8:
        return "needs a head dim that is a multiple of 8"
    if backend == "flash_attn":
        return "takes head dims up to 256" if head_dim > 256 else None
    limit = 256 if capability >= (9, 0) else 128
    if head_dim > limit:
        return f"takes head dims up to {limit} on compute capability {capability}"
    if _cudnn_version() in (91000, 91001):
        return "is disabled by Transformer Engine on cuDNN 9.10.0/9.10.1"
    return None


def _varlen_fits(backend: str, q: Tensor) -> bool:
    """Whether ``backend`` (already fit for ``q``) runs packed rectangles in variable-length
    calls: flash-attn always; TE's ``thd`` layout on sm90/sm100 with cuDNN ≥ 9.6, whose ragged
    softmax stats the adapter reads."""
    if backend == "flash_attn":
        return True
    if backend == "te_fused":
        return _gpu_capability(q)[0] in (9, 10) and _cudnn_version() >= 90600
    return False


@contextlib.contextmanager
def forced_backend(name: str) -> Iterator[None]:
    """Run the code inside with ``MLV_ATTENTION_BACKEND=name`` (restored afterwards)."""
    before = os.environ.get("MLV_ATTENTION_BACKEND")
    os.environ["MLV_ATTENTION_BACKEND"] = name
    try:
        yield
    finally:
        if before is None:
            del os.environ["MLV_ATTENTION_BACKEND"]
        else:
            os.environ["MLV_ATTENTION_BACKEND"] = before


def select_backend(q: Tensor, mask: Tensor | None = None) -> str:
    """The kernel for a block of ``q`` (its device, dtype and head dim), with or without an
    explicit ``mask`` (which only ``math`` takes)."""
    forced = os.environ.get("MLV_ATTENTION_BACKEND")
    if forced:
        if forced not in BACKENDS:
            raise ValueError(f"MLV_ATTENTION_BACKEND={forced!r}; known backends: {BACKENDS}")
        reason = _why_not(forced, q)
        if reason is None and mask is not None and forced != "math":
            reason = "takes no explicit mask (only math runs arbitrary masks)"
        if reason is not None:
            raise ValueError(
                f"MLV_ATTENTION_BACKEND={forced} cannot run this block: {forced} {reason} "
                f"(dtype {q.dtype}, head_dim {q.shape[-1]}, device {q.device})"
            )
        return forced
    if mask is not None:
        return "math"
    return next(name for name in BACKENDS if _why_not(name, q) is None)


# --------------------------------------------------------------------------------------------
# FLOP counting (load-balance measurements)
# --------------------------------------------------------------------------------------------


@dataclass
class FlopCount:
    """Forward attention FLOPs (2 matmuls × 2 FLOPs per multiply-add) over attended pairs."""

    forward: int = 0


_flop_counters: list[FlopCount] = []


@contextlib.contextmanager
def counting_flops() -> Iterator[FlopCount]:
    """Count the forward FLOPs of every block kernel run inside the block."""
    count = FlopCount()
    _flop_counters.append(count)
    try:
        yield count
    finally:
        _flop_counters.remove(count)


def _record_flops(q: Tensor, pairs_per_head: int) -> None:
    for count in _flop_counters:
        count.forward += 4 * q.shape[-1] * q.shape[2] * pairs_per_head


def _dense_pairs(q: Tensor, k: Tensor, causal: bool, mask: Tensor | None) -> int:
    b, sq = q.shape[:2]
    if mask is not None:
        return int(mask.sum())
    return b * sq * (sq + 1) // 2 if causal else b * sq * k.shape[1]


# --------------------------------------------------------------------------------------------
# Public entry points
# --------------------------------------------------------------------------------------------


def block_forward(
    q: Tensor, k: Tensor, v: Tensor, *, scale: float, causal: bool, mask: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Attention of one block: ``(out [b, sq, hq, d], lse [b, hq, sq] fp32)``."""
    _check_block(q, k, causal, mask)
    if _flop_counters:
        _record_flops(q, _dense_pairs(q, k, causal, mask))
    return _dense_forward(select_backend(q, mask), q, k, v, scale, causal, mask)


def block_backward(
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    *,
    scale: float,
    causal: bool,
    mask: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of one block given the merged row output and lse: ``(dq, dk, dv)``."""
    _check_block(q, k, causal, mask)
    backend = select_backend(q, mask)
    return _dense_backward(backend, dout, q, k, v, out, lse, scale, causal, mask)


def merge_by_lse(
    out: Tensor, lse: Tensor, block_out: Tensor, block_lse: Tensor
) -> tuple[Tensor, Tensor]:
    """Combine two softmax-normalised partial results over disjoint key sets.

    out: [b, s, h, d] fp32, lse: [b, h, s]; rows where both lse are -inf stay (0, -inf).
    """
    new_lse = torch.logaddexp(lse, block_lse)
    finite = new_lse.masked_fill(torch.isneginf(new_lse), 0.0)
    weight_old = torch.exp(lse - finite).transpose(1, 2).unsqueeze(-1)
    weight_new = torch.exp(block_lse - finite).transpose(1, 2).unsqueeze(-1)
    return out * weight_old + block_out.float() * weight_new, new_lse


def rectangles_forward(
    q: Tensor, k: Tensor, v: Tensor, plan: RectanglePlan, *, scale: float
) -> tuple[Tensor, Tensor]:
    """Attention of one packed block over ``plan``'s rectangles only.

    Returns ``(out [b, sq, hq, d] fp32, lse [b, hq, sq] fp32)``; rows no rectangle covers
    (padding) get ``(0, -inf)``.
    """
    _check_plan(q, k, plan)
    backend = select_backend(q)
    if _flop_counters:
        _record_flops(q, plan.pairs)
    b, sq, hq, d = q.shape
    if _varlen_fits(backend, q):
        return _varlen_forward(backend, q, k, v, plan, scale)
    out = torch.zeros((b, sq, hq, d), dtype=torch.float32, device=q.device)
    lse = torch.full((b, hq, sq), float("-inf"), dtype=torch.float32, device=q.device)
    for rect in plan.rectangles:
        rows, qs, ks = _rect_slices(rect)
        part_out, part_lse = _dense_forward(
            backend, q[rows, qs], k[rows, ks], v[rows, ks], scale, rect.causal, None
        )
        out[rows, qs], lse[rows, :, qs] = merge_by_lse(
            out[rows, qs], lse[rows, :, qs], part_out, part_lse
        )
    return out, lse


def rectangles_backward(
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    plan: RectanglePlan,
    *,
    scale: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of one packed block given the merged row output and lse: ``(dq, dk, dv)`` in
    float32, shaped like ``q, k, v``."""
    _check_plan(q, k, plan)
    backend = select_backend(q)
    if _varlen_fits(backend, q):
        return _varlen_backward(backend, dout, q, k, v, out, lse, plan, scale)
    dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    dk = torch.zeros(k.shape, dtype=torch.float32, device=k.device)
    dv = torch.zeros(v.shape, dtype=torch.float32, device=v.device)
    for rect in plan.rectangles:
        rows, qs, ks = _rect_slices(rect)
        gq, gk, gv = _dense_backward(
            backend,
            dout[rows, qs],
            q[rows, qs],
            k[rows, ks],
            v[rows, ks],
            out[rows, qs],
            lse[rows, :, qs],
            scale,
            rect.causal,
            None,
        )
        dq[rows, qs] += gq
        dk[rows, ks] += gk
        dv[rows, ks] += gv
    return dq, dk, dv


def _rect_slices(rect: Rectangle) -> tuple[slice, slice, slice]:
    return (
        slice(rect.row, rect.row + 1),
        slice(rect.q_start, rect.q_stop),
        slice(rect.k_start, rect.k_stop),
    )


def _check_block(q: Tensor, k: Tensor, causal: bool, mask: Tensor | None) -> None:
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"{q.shape[2]} query heads are not a multiple of {k.shape[2]} kv heads")
    if mask is not None and causal:
        raise ValueError("give either causal=True or an explicit mask, not both")
    if causal and q.shape[1] != k.shape[1]:
        raise ValueError(
            f"a causal block needs sq == sk, got {q.shape[1]} and {k.shape[1]} (kernels align "
            "a non-square causal mask differently: top-left in TE and PyTorch, bottom-right in "
            "flash-attn)"
        )


def _check_plan(q: Tensor, k: Tensor, plan: RectanglePlan) -> None:
    _check_block(q, k, False, None)
    if (plan.batch, plan.sq, plan.sk) != (q.shape[0], q.shape[1], k.shape[1]):
        raise ValueError(
            f"rectangle plan for [b={plan.batch}, sq={plan.sq}, sk={plan.sk}] given q "
            f"{tuple(q.shape)} and k {tuple(k.shape)}"
        )


def _dense_forward(backend, q, k, v, scale, causal, mask):
    if backend == "math":
        return _math_forward(q, k, v, scale, causal, mask)
    return _FORWARD[backend](q, k, v, scale, causal)


def _dense_backward(backend, dout, q, k, v, out, lse, scale, causal, mask):
    if backend == "math":
        return _math_backward(dout, q, k, v, out, lse, scale, causal, mask)
    return _BACKWARD[backend](dout, q, k, v, out, lse, scale, causal)


# --------------------------------------------------------------------------------------------
# Variable-length calls: each group of rectangles packed into one thd call
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Packing:
    """Token indices (into ``[b·sq]`` / ``[b·sk]``) of one group's rectangles, back to back,
    and their int32 ``cu_seqlens``."""

    q_index: Tensor
    k_index: Tensor
    cu_q: Tensor
    cu_k: Tensor
    max_q: int
    max_k: int
    causal: bool


def _packing(group: tuple[Rectangle, ...], sq: int, sk: int, device) -> _Packing:
    def indices(starts, stops):
        return torch.cat([torch.arange(a, z) for a, z in zip(starts, stops)])

    def cu(lengths):
        return torch.tensor([0, *lengths], dtype=torch.int32).cumsum(0, dtype=torch.int32)

    q_len = [r.q_len for r in group]
    k_len = [r.k_len for r in group]
    return _Packing(
        indices([r.row * sq + r.q_start for r in group], [r.row * sq + r.q_stop for r in group]).to(
            device
        ),
        indices([r.row * sk + r.k_start for r in group], [r.row * sk + r.k_stop for r in group]).to(
            device
        ),
        cu(q_len).to(device),
        cu(k_len).to(device),
        max(q_len),
        max(k_len),
        group[0].causal,
    )


def _tokens(x: Tensor) -> Tensor:
    """[b, s, h, d] -> [b·s, h, d]."""
    return x.reshape(-1, *x.shape[2:])


def _varlen_forward(backend, q, k, v, plan: RectanglePlan, scale):
    b, sq, hq, d = q.shape
    out = torch.zeros((b * sq, hq, d), dtype=torch.float32, device=q.device)
    lse = torch.full((b * sq, hq), float("-inf"), dtype=torch.float32, device=q.device)
    qt, kt, vt = _tokens(q), _tokens(k), _tokens(v)
    for group in plan.passes:
        p = _packing(group, sq, plan.sk, q.device)
        part_out, part_lse = _VARLEN_FORWARD[backend](
            qt.index_select(0, p.q_index),
            kt.index_select(0, p.k_index),
            vt.index_select(0, p.k_index),
            p.cu_q,
            p.cu_k,
            p.max_q,
            p.max_k,
            scale,
            p.causal,
        )
        merged_out, merged_lse = merge_by_lse(
            out.index_select(0, p.q_index)[None],
            lse.index_select(0, p.q_index).T[None],
            part_out[None],
            part_lse[None],
        )
        out.index_copy_(0, p.q_index, merged_out[0])
        lse.index_copy_(0, p.q_index, merged_lse[0].T)
    return out.view(b, sq, hq, d), lse.view(b, sq, hq).transpose(1, 2).contiguous()


def _varlen_backward(backend, dout, q, k, v, out, lse, plan: RectanglePlan, scale):
    b, sq, hq, _ = q.shape
    qt, kt, vt, dot, ot = _tokens(q), _tokens(k), _tokens(v), _tokens(dout), _tokens(out)
    lse_t = lse.transpose(1, 2).reshape(b * sq, hq)
    dq = torch.zeros(qt.shape, dtype=torch.float32, device=q.device)
    dk = torch.zeros(kt.shape, dtype=torch.float32, device=k.device)
    dv = torch.zeros(vt.shape, dtype=torch.float32, device=v.device)
    for group in plan.passes:
        p = _packing(group, sq, plan.sk, q.device)
        gq, gk, gv = _VARLEN_BACKWARD[backend](
            dot.index_select(0, p.q_index),
            qt.index_select(0, p.q_index),
            kt.index_select(0, p.k_index),
            vt.index_select(0, p.k_index),
            ot.index_select(0, p.q_index),
            lse_t.index_select(0, p.q_index).T.contiguous(),
            p.cu_q,
            p.cu_k,
            p.max_q,
            p.max_k,
            scale,
            p.causal,
        )
        dq.index_add_(0, p.q_index, gq.float())
        dk.index_add_(0, p.k_index, gk.float())
        dv.index_add_(0, p.k_index, gv.float())
    return dq.view(q.shape), dk.view(k.shape), dv.view(v.shape)


# --------------------------------------------------------------------------------------------
# math: explicit softmax, exact, any mask (the reference)
# --------------------------------------------------------------------------------------------


def _grouped(x: Tensor, kv_heads: int, dtype: torch.dtype) -> Tensor:
    """[b, s, h, d] -> [b, kv_heads, h / kv_heads, s, d] in ``dtype``."""
    b, s, h, d = x.shape
    return x.to(dtype).view(b, s, kv_heads, h // kv_heads, d).permute(0, 2, 3, 1, 4)


def _ungrouped(x: Tensor) -> Tensor:
    """[b, kv_heads, g, s, d] -> [b, s, kv_heads * g, d]."""
    b, hk, g, s, d = x.shape
    return x.permute(0, 3, 1, 2, 4).reshape(b, s, hk * g, d)


#: Query rows the math kernel takes at a time: its fp32 scores and probabilities then hold
#: b·h·rows·sk values instead of b·h·sq·sk (an explicit mask stays whole, [b, sq, sk] bool).
MATH_QUERY_ROWS = 1024


def _row_pieces(sq: int) -> list[slice]:
    return [
        slice(start, min(start + MATH_QUERY_ROWS, sq)) for start in range(0, sq, MATH_QUERY_ROWS)
    ]


def _allowed(mask: Tensor | None, causal: bool, rows: slice, sk: int, device) -> Tensor | None:
    """Boolean [b or 1, 1, 1, len(rows), sk] of the pairs query ``rows`` may attend, or None for
    all."""
    if mask is not None:
        return mask[:, rows][:, None, None]
    if causal:
        query = torch.arange(rows.start, rows.stop, device=device)[:, None]
        return (query >= torch.arange(sk, device=device)[None])[None, None, None]
    return None


def _math_probs(q, k, lse_or_none, scale, causal, mask, rows: slice):
    """Scores → probabilities (and lse) of query ``rows`` (``q`` and ``lse_or_none`` already cut
    to them). Masked pairs get probability 0; empty rows lse -inf."""
    acc = torch.promote_types(q.dtype, torch.float32)
    hk = k.shape[2]
    qg, kg = _grouped(q, hk, acc), _grouped(k, hk, acc)  # [b, hk, g, rows, d], [b, hk, 1, sk, d]
    scores = (qg @ kg.transpose(-1, -2)) * scale
    allowed = _allowed(mask, causal, rows, k.shape[1], q.device)
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    if lse_or_none is None:
        lse = torch.logsumexp(scores, dim=-1)
    else:
        b, hq, n = lse_or_none.shape
        lse = lse_or_none.to(acc).view(b, hk, hq // hk, n)
    # An empty row has lse -inf; subtracting 0 instead keeps its probabilities exp(-inf) = 0.
    finite_lse = lse.masked_fill(torch.isneginf(lse), 0.0)
    return torch.exp(scores - finite_lse[..., None]), lse, qg, kg


def _math_forward(q, k, v, scale, causal, mask):
    outs, lses = [], []
    for rows in _row_pieces(q.shape[1]):
        probs, lse, _, _ = _math_probs(q[:, rows], k, None, scale, causal, mask, rows)
        outs.append(_ungrouped(probs @ _grouped(v, v.shape[2], probs.dtype)))
        lses.append(lse)
    b, sq, hq, _ = q.shape
    return torch.cat(outs, 1).to(q.dtype), torch.cat(lses, -1).reshape(b, hq, sq).float()


def _math_backward(dout, q, k, v, out, lse, scale, causal, mask):
    hk = k.shape[2]
    dqs, dk, dv = [], 0, 0
    for rows in _row_pieces(q.shape[1]):
        probs, _, qg, kg = _math_probs(q[:, rows], k, lse[..., rows], scale, causal, mask, rows)
        acc = probs.dtype
        dog, og = _grouped(dout[:, rows], hk, acc), _grouped(out[:, rows], hk, acc)
        vg = _grouped(v, hk, acc)
        dv = dv + (probs.transpose(-1, -2) @ dog).sum(2, keepdim=True)
        dprobs = dog @ vg.transpose(-1, -2)
        delta = (dog * og).sum(-1, keepdim=True)
        dscores = probs * (dprobs - delta)
        dqs.append(_ungrouped((dscores @ kg) * scale))
        dk = dk + (dscores.transpose(-1, -2) @ qg).sum(2, keepdim=True) * scale
    return torch.cat(dqs, 1).to(q.dtype), _ungrouped(dk).to(k.dtype), _ungrouped(dv).to(v.dtype)


# --------------------------------------------------------------------------------------------
# cpu_flash: PyTorch's CPU flash kernel (returns logsumexp; has a backward op)
# --------------------------------------------------------------------------------------------


def _cpu_flash_forward(q, k, v, scale, causal):
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), 0.0, causal, scale=scale
    )
    return out.transpose(1, 2), lse.float()


def _cpu_flash_backward(dout, q, k, v, out, lse, scale, causal):
    dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        dout.transpose(1, 2).to(q.dtype),
        q.transpose(1, 2),
        k.transpose(1, 2),
        v.transpose(1, 2),
        out.transpose(1, 2).to(q.dtype),
        lse.contiguous(),
        0.0,
        causal,
        scale=scale,
    )
    return dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2)


_FORWARD = {
    "cpu_flash": _cpu_flash_forward,
    "flash_attn": gpu_kernels.flash_attn_forward,
    "te_fused": gpu_kernels.te_fused_forward,
}
_BACKWARD = {
    "cpu_flash": _cpu_flash_backward,
    "flash_attn": gpu_kernels.flash_attn_backward,
    "te_fused": gpu_kernels.te_fused_backward,
}
_VARLEN_FORWARD = {
    "flash_attn": gpu_kernels.flash_attn_varlen_forward,
    "te_fused": gpu_kernels.te_fused_varlen_forward,
}
_VARLEN_BACKWARD = {
    "flash_attn": gpu_kernels.flash_attn_varlen_backward,
    "te_fused": gpu_kernels.te_fused_varlen_backward,
}
