"""Local attention kernels for one (query block, key/value block) pair, returning (out, lse).

Ring attention merges partial results by their log-sum-exp, and its backward feeds each block the
*merged* output and lse, so every kernel here exposes both halves:

* :func:`block_forward` ``(q, k, v) -> (out, lse)``
* :func:`block_backward` ``(dout, q, k, v, out, lse) -> (dq, dk, dv)`` with ``out``/``lse`` those
  of the whole row (all blocks merged), which makes the block's gradients exact.

Shapes: ``q: [b, sq, hq, d]``, ``k, v: [b, sk, hkv, d]`` (``hkv`` divides ``hq``; query head ``h``
uses kv head ``h // (hq / hkv)``), ``out: [b, sq, hq, d]``, ``lse: [b, hq, sq]`` float32.
A block is either unmasked, causal (``sq == sk``, query ``i`` sees keys ``0..i``), or given an
explicit boolean ``mask: [b, sq, sk]`` (True = may attend; packed segments). A query row that may
attend to nothing gets ``out = 0`` and ``lse = -inf``, and zero gradients, never NaN.

This module is the one place that chooses a backend (:func:`select_backend`):

* ``cpu_flash``: PyTorch's CPU flash kernel
  (``aten._scaled_dot_product_flash_attention_for_cpu`` and its backward op);
* ``flash_attn``: the flash-attn package (CUDA, fp16/bf16), when installed;
* ``te_fused``: Transformer Engine's fused attention (CUDA, fp16/bf16), when installed;
* ``math``: explicit softmax in fp32 (or fp64), exact; the path for explicit masks and the
  fallback for everything else.

``MLV_ATTENTION_BACKEND`` forces a backend (e.g. ``math``) for comparisons.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

Tensor = torch.Tensor
BACKENDS = ("cpu_flash", "flash_attn", "te_fused", "math")

# --------------------------------------------------------------------------------------------
# Backend selection
# --------------------------------------------------------------------------------------------


def _optional_module(name: str) -> Any:
    try:
        return importlib.import_module(name)
    except Exception:  # not installed, or installed without a usable CUDA build
        return None


def available_backends() -> list[str]:
    """Backends usable in this process."""
    found = ["cpu_flash", "math"]
    if torch.cuda.is_available():
        if _optional_module("flash_attn.flash_attn_interface") is not None:
            found.append("flash_attn")
        if _optional_module("transformer_engine.pytorch.cpp_extensions.fused_attn") is not None:
            found.append("te_fused")
    return found


def select_backend(q: Tensor, mask: Tensor | None) -> str:
    """The kernel for a block of ``q`` (its device and dtype) with or without an explicit mask."""
    forced = os.environ.get("MLV_ATTENTION_BACKEND")
    if forced:
        if forced not in BACKENDS:
            raise ValueError(f"MLV_ATTENTION_BACKEND={forced!r}; known backends: {BACKENDS}")
        return "math" if mask is not None else forced
    if mask is not None:
        return "math"
    if q.device.type == "cpu":
        return "cpu_flash"
    if q.dtype in (torch.float16, torch.bfloat16):
        available = available_backends()
        for name in ("flash_attn", "te_fused"):
            if name in available:
                return name
    return "math"


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


def _record_flops(q: Tensor, k: Tensor, causal: bool, mask: Tensor | None) -> None:
    if not _flop_counters:
        return
    b, sq, hq, d = q.shape
    if mask is not None:
        pairs = int(mask.sum()) * hq
    elif causal:
        pairs = b * hq * sq * (sq + 1) // 2
    else:
        pairs = b * hq * sq * k.shape[1]
    for count in _flop_counters:
        count.forward += 4 * d * pairs


# --------------------------------------------------------------------------------------------
# Public entry points
# --------------------------------------------------------------------------------------------


def block_forward(
    q: Tensor, k: Tensor, v: Tensor, *, scale: float, causal: bool, mask: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Attention of one block: ``(out [b, sq, hq, d], lse [b, hq, sq] fp32)``."""
    _check_block(q, k, causal, mask)
    _record_flops(q, k, causal, mask)
    backend = select_backend(q, mask)
    return _FORWARD[backend](q, k, v, scale, causal, mask)


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
    return _BACKWARD[backend](dout, q, k, v, out, lse, scale, causal, mask)


def _check_block(q: Tensor, k: Tensor, causal: bool, mask: Tensor | None) -> None:
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"{q.shape[2]} query heads are not a multiple of {k.shape[2]} kv heads")
    if mask is not None and causal:
        raise ValueError("give either causal=True or an explicit mask, not both")
    if causal and q.shape[1] != k.shape[1]:
        raise ValueError(f"a causal block needs sq == sk, got {q.shape[1]} and {k.shape[1]}")


# --------------------------------------------------------------------------------------------
# math: explicit softmax, exact, any mask
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


def _cpu_flash_forward(q, k, v, scale, causal, mask):
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), 0.0, causal, scale=scale
    )
    return out.transpose(1, 2), lse.float()


def _cpu_flash_backward(dout, q, k, v, out, lse, scale, causal, mask):
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


# --------------------------------------------------------------------------------------------
# flash_attn: the flash-attn package (CUDA)
# --------------------------------------------------------------------------------------------


def _call_with_accepted(fn: Callable[..., Any], candidates: dict[str, Any]) -> Any:
    """Call ``fn`` with those of ``candidates`` its signature names.

    The private entry points of flash-attn and TE rename arguments between releases
    (``window_size`` → ``window_size_left/right``, ``qkv_dtype`` → ``fake_dtype``); offering every
    known spelling and passing the accepted ones keeps one call site for all of them.
    """
    target = getattr(fn, "_init_fn", fn)  # torch.library custom ops keep the Python function here
    names = inspect.signature(target).parameters
    return fn(**{k: v for k, v in candidates.items() if k in names})


def _flash_attn_common(scale: float, causal: bool) -> dict[str, Any]:
    return {
        "dropout_p": 0.0,
        "softmax_scale": scale,
        "causal": causal,
        "window_size": (-1, -1),
        "window_size_left": -1,
        "window_size_right": -1,
        "softcap": 0.0,
        "alibi_slopes": None,
        "deterministic": False,
        "return_softmax": False,
        "rng_state": None,
    }


def _flash_attn_forward(q, k, v, scale, causal, mask):
    fa = importlib.import_module("flash_attn.flash_attn_interface")
    result = _call_with_accepted(
        fa._flash_attn_forward,
        {"q": q.contiguous(), "k": k.contiguous(), "v": v.contiguous()}
        | _flash_attn_common(scale, causal),
    )
    # Releases up to 2.5 return (out, q, k, v, out_padded, lse, S_dmask, rng_state);
    # later ones (out, lse, S_dmask, rng_state).
    out, lse = (result[0], result[5]) if len(result) == 8 else (result[0], result[1])
    return out, lse.float()


def _flash_attn_backward(dout, q, k, v, out, lse, scale, causal, mask):
    fa = importlib.import_module("flash_attn.flash_attn_interface")
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    _call_with_accepted(
        fa._flash_attn_backward,
        {
            "dout": dout.to(q.dtype).contiguous(),
            "q": q,
            "k": k,
            "v": v,
            "out": out.to(q.dtype).contiguous(),
            "softmax_lse": lse.contiguous(),
            "dq": dq,
            "dk": dk,
            "dv": dv,
        }
        | _flash_attn_common(scale, causal),
    )
    return dq, dk, dv


# --------------------------------------------------------------------------------------------
# te_fused: Transformer Engine fused attention (CUDA, cuDNN)
# --------------------------------------------------------------------------------------------


def _te_common(q: Tensor, k: Tensor, scale: float, causal: bool) -> dict[str, Any]:
    fused = importlib.import_module("transformer_engine.pytorch.cpp_extensions.fused_attn")
    te_dtype = importlib.import_module("transformer_engine.pytorch.constants").TE_DType[q.dtype]
    b, sq, sk = q.shape[0], q.shape[1], k.shape[1]
    arange = lambda s: torch.arange(0, (b + 1) * s, s, dtype=torch.int32, device=q.device)
    return {
        "max_seqlen_q": sq,
        "max_seqlen_kv": sk,
        "cu_seqlens_q": arange(sq),
        "cu_seqlens_kv": arange(sk),
        "fake_dtype": q.dtype,
        "qkv_dtype": te_dtype,
        "dqkv_dtype": te_dtype,
        "fused_attention_backend": fused.FusedAttnBackend["F16_arbitrary_seqlen"],
        "attn_scale": scale,
        "dropout": 0.0,
        "qkv_layout": "bshd_bshd_bshd",
        "attn_bias_type": "no_bias",
        "attn_mask_type": "causal" if causal else "no_mask",
    }


def _te_fused_forward(q, k, v, scale, causal, mask):
    fused = importlib.import_module("transformer_engine.pytorch.cpp_extensions.fused_attn")
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    out, aux = _call_with_accepted(
        fused.fused_attn_fwd,
        {"is_training": True, "q": q, "k": k, "v": v} | _te_common(q, k, scale, causal),
    )
    return out, aux[0].squeeze(-1).float()  # softmax stats [b, h, sq, 1]: the row lse


def _te_fused_backward(dout, q, k, v, out, lse, scale, causal, mask):
    fused = importlib.import_module("transformer_engine.pytorch.cpp_extensions.fused_attn")
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    # Without dropout the rng state is never read, but the kernel expects the slot.
    rng_state = torch.zeros(2, dtype=torch.int64, device=q.device)
    grads = _call_with_accepted(
        fused.fused_attn_bwd,
        {
            "q": q,
            "k": k,
            "v": v,
            "o": out.to(q.dtype).contiguous(),
            "d_o": dout.to(q.dtype).contiguous(),
            "aux_ctx_tensors": [lse.unsqueeze(-1).contiguous(), rng_state],
        }
        | _te_common(q, k, scale, causal),
    )
    return grads[0], grads[1], grads[2]


_FORWARD = {
    "cpu_flash": _cpu_flash_forward,
    "flash_attn": _flash_attn_forward,
    "te_fused": _te_fused_forward,
    "math": _math_forward,
}
_BACKWARD = {
    "cpu_flash": _cpu_flash_backward,
    "flash_attn": _flash_attn_backward,
    "te_fused": _te_fused_backward,
    "math": _math_backward,
}
