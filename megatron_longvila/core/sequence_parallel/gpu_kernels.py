"""Adapters for the GPU attention kernels of flash-attn and Transformer Engine.

Each adapter calls a library's private forward/backward entry points, which return the softmax
log-sum-exp the ring merge needs, and checks every result's shape and dtype. :mod:`.kernels`
decides which adapter runs; nothing here chooses.

Dense blocks (``q: [b, sq, hq, d]``, ``k, v: [b, sk, hkv, d]``, ``bshd``):
``*_forward(q, k, v, scale, causal) -> (out like q, lse [b, hq, sq] fp32)`` and
``*_backward(dout, q, k, v, out, lse, scale, causal) -> (dq, dk, dv)`` like ``q, k, v``.
Causal blocks are square (``sq == sk``), where top-left (TE ``"causal"``) and bottom-right
(flash-attn) alignment agree.

Packed rectangles (``thd``: ``q: [tq, hq, d]``, ``k, v: [tk, hkv, d]``, sequences delimited by
int32 ``cu_seqlens``): ``*_varlen_forward(...) -> (out [tq, hq, d], lse [hq, tq] fp32)`` and
``*_varlen_backward(...) -> (dq, dk, dv)``; one kind (causal or unmasked) per call.

Versions (read from the libraries' source):

* flash-attn 2.6.x takes ``window_size=(left, right)`` and returns 8 values (lse at index 5);
  2.7+ wraps the functions as ``torch.library`` custom ops (Python function in ``_init_fn``) with
  ``window_size_left/right`` and returns ``(out, lse, S_dmask, rng_state)``. The backward writes
  into preallocated ``dq, dk, dv``. Varlen lse is ``[h, total_q]`` from 2.6 on.
* Transformer Engine 2.15+ adds ``o_format`` (fwd), ``do_format`` and ``dqkv_layout`` (bwd),
  all defaulting to ``sbhd`` — a ``bshd`` caller that leaves them out gets ``[s, b, h, d]``
  outputs and dQ/dK/dV views into one interleaved buffer — and drops the bwd's ``dqkv_dtype``,
  which older releases require. ``window_size=(-1, 0)`` goes with causal masks (cuDNN 9.2–9.5
  reject causal with ``(-1, -1)``). Softmax stats are ``[b, h, sq, 1]`` (``bshd``) or, for
  ``thd`` with cuDNN ≥ 9.6, ``[T, h, 1]`` with ``T`` padded up by TE < 2.11.
"""

from __future__ import annotations

import importlib
import inspect
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

Tensor = torch.Tensor

# --------------------------------------------------------------------------------------------
# Calling private entry points whose signatures move between releases
# --------------------------------------------------------------------------------------------


def call_with_accepted(
    fn: Callable[..., Any], required: dict[str, Any], one_of: Sequence[dict[str, Any]] = ()
) -> Any:
    """Call ``fn`` by keyword with every argument of ``required`` and the first spelling in
    ``one_of`` (e.g. ``window_size`` vs ``window_size_left/right``) that ``fn`` takes whole.

    Nothing is dropped silently: an argument of ``required`` that ``fn`` does not take, or no
    accepted spelling, raises ``TypeError`` — a lost layout, scale, mask or window argument
    would give wrong results, not an error.
    """
    target = getattr(fn, "_init_fn", fn)  # torch.library custom ops keep the Python function here
    params = inspect.signature(target).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    name = getattr(target, "__qualname__", repr(fn))

    def accepted(names) -> bool:
        return takes_any or all(n in params for n in names)

    missing = [n for n in required if not accepted([n])]
    if missing:
        raise TypeError(
            f"{name} does not take {missing}: this library version is not supported "
            "(refusing to drop arguments that change the result)"
        )
    kwargs = dict(required)
    if one_of:
        spelling = next((s for s in one_of if accepted(s)), None)
        if spelling is None:
            raise TypeError(f"{name} takes none of {[sorted(s) for s in one_of]}")
        kwargs |= spelling
    return fn(**kwargs)


def check_result(backend: str, call: str, got: dict[str, Tensor], want: dict[str, tuple]) -> None:
    """Raise naming ``backend`` and ``call`` unless every ``got[name]`` has the shape and dtype
    ``want[name] = (shape, dtype)``."""
    for name, (shape, dtype) in want.items():
        t = got[name]
        if tuple(t.shape) != tuple(shape) or t.dtype != dtype:
            raise RuntimeError(
                f"{backend} {call}: {name} came back {tuple(t.shape)} {t.dtype}, expected "
                f"{tuple(shape)} {dtype} (inputs {_describe(got)})"
            )


def _describe(tensors: dict[str, Tensor]) -> str:
    return ", ".join(f"{n} {tuple(t.shape)}" for n, t in tensors.items())


def _window(causal: bool) -> tuple[int, int]:
    return (-1, 0) if causal else (-1, -1)


# --------------------------------------------------------------------------------------------
# flash-attn
# --------------------------------------------------------------------------------------------


def _flash_interface():
    return importlib.import_module("flash_attn.flash_attn_interface")


def _flash_common(scale: float, causal: bool) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    left, right = _window(causal)
    required = {
        "dropout_p": 0.0,
        "softmax_scale": scale,
        "causal": causal,
        "softcap": 0.0,
        "alibi_slopes": None,
    }
    windows = [
        {"window_size_left": left, "window_size_right": right},
        {"window_size": (left, right)},
    ]
    return required, windows


def _flash_out_lse(result: Sequence[Tensor], call: str) -> tuple[Tensor, Tensor]:
    if len(result) == 4:  # 2.7+: (out, lse, S_dmask, rng_state)
        return result[0], result[1]
    if len(result) == 8:  # 2.6: (out, q, k, v, out_padded, lse, S_dmask, rng_state)
        return result[0], result[5]
    raise RuntimeError(f"flash_attn {call} returned {len(result)} values; expected 4 or 8")


def _flash_forward(name: str, q, k, v, scale, causal, lse_shape, varlen_args=None):
    """``_flash_attn_<name>`` on contiguous inputs; checks out like q and lse fp32."""
    required, windows = _flash_common(scale, causal)
    result = call_with_accepted(
        getattr(_flash_interface(), f"_flash_attn_{name}"),
        {"q": q, "k": k, "v": v, "return_softmax": False} | (varlen_args or {}) | required,
        windows,
    )
    out, lse = _flash_out_lse(result, f"_flash_attn_{name}")
    check_result(
        "flash_attn",
        f"_flash_attn_{name}",
        {"q": q, "k": k, "out": out, "lse": lse},
        {"out": (q.shape, q.dtype), "lse": (lse_shape, torch.float32)},
    )
    return out, lse


def _flash_backward(name: str, dout, q, k, v, out, lse, scale, causal, varlen_args=None):
    """``_flash_attn_<name>``, which writes into preallocated dq, dk, dv; checks them."""
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    required, windows = _flash_common(scale, causal)
    call_with_accepted(
        getattr(_flash_interface(), f"_flash_attn_{name}"),
        {
            "dout": dout.to(q.dtype).contiguous(),
            "q": q,
            "k": k,
            "v": v,
            "out": out.to(q.dtype).contiguous(),
            "softmax_lse": lse.float().contiguous(),
            "dq": dq,
            "dk": dk,
            "dv": dv,
            "deterministic": False,
            "rng_state": None,
        }
        | (varlen_args or {})
        | required,
        windows,
    )
    _check_grads("flash_attn", f"_flash_attn_{name}", q, k, v, dq, dk, dv)
    return dq, dk, dv


def _check_grads(backend, call, q, k, v, dq, dk, dv) -> None:
    check_result(
        backend,
        call,
        {"q": q, "k": k, "dq": dq, "dk": dk, "dv": dv},
        {"dq": (q.shape, q.dtype), "dk": (k.shape, k.dtype), "dv": (v.shape, v.dtype)},
    )


def _varlen_args(cu_q, cu_k, max_q, max_k) -> dict[str, Any]:
    return {
        "cu_seqlens_q": cu_q,
        "cu_seqlens_k": cu_k,
        "max_seqlen_q": max_q,
        "max_seqlen_k": max_k,
    }


def flash_attn_forward(q, k, v, scale, causal):
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    b, sq, hq, _ = q.shape
    return _flash_forward("forward", q, k, v, scale, causal, (b, hq, sq))


def flash_attn_backward(dout, q, k, v, out, lse, scale, causal):
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    return _flash_backward("backward", dout, q, k, v, out, lse, scale, causal)


def flash_attn_varlen_forward(q, k, v, cu_q, cu_k, max_q, max_k, scale, causal):
    tq, hq, _ = q.shape
    varlen = _varlen_args(cu_q, cu_k, max_q, max_k)
    return _flash_forward("varlen_forward", q, k, v, scale, causal, (hq, tq), varlen)


def flash_attn_varlen_backward(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, scale, causal):
    varlen = _varlen_args(cu_q, cu_k, max_q, max_k)
    return _flash_backward("varlen_backward", dout, q, k, v, out, lse, scale, causal, varlen)


# --------------------------------------------------------------------------------------------
# Transformer Engine fused attention (cuDNN)
# --------------------------------------------------------------------------------------------

_TE_FUSED = "transformer_engine.pytorch.cpp_extensions.fused_attn"


def te_version() -> tuple[int, int]:
    """(major, minor) of the installed Transformer Engine."""
    version = importlib.import_module("transformer_engine").__version__
    major, minor = version.split(".")[:2]
    return int(major), int("".join(c for c in minor if c.isdigit()) or 0)


def _te_layout_args(fmt: str, backward: bool, dtype: torch.dtype) -> dict[str, Any]:
    """TE 2.15+ output/gradient layouts (default sbhd there); older releases lay outputs out
    like q and need the gradients' dtype instead."""
    layout = "_".join([fmt] * 3)
    if te_version() >= (2, 15):
        return {"o_format": fmt} | ({"do_format": fmt, "dqkv_layout": layout} if backward else {})
    if not backward:
        return {}
    te_dtype = importlib.import_module("transformer_engine.pytorch.constants").TE_DType
    return {"dqkv_dtype": te_dtype[dtype]}


def _te_common(
    fmt: str, q: Tensor, cu_q: Tensor, cu_k: Tensor, max_q: int, max_k: int, scale, causal
) -> dict[str, Any]:
    fused = importlib.import_module(_TE_FUSED)
    if fmt == "thd":
        mask = "padding_causal" if causal else "padding"
        # Sequences lie back to back: their offsets in the packed tensors are cu_seqlens.
        extra = {"cu_seqlens_q_padded": cu_q, "cu_seqlens_kv_padded": cu_k}
    else:
        mask, extra = ("causal" if causal else "no_mask"), {}
    return {
        "max_seqlen_q": max_q,
        "max_seqlen_kv": max_k,
        "cu_seqlens_q": cu_q,
        "cu_seqlens_kv": cu_k,
        "fake_dtype": q.dtype,
        "fused_attention_backend": fused.FusedAttnBackend["F16_arbitrary_seqlen"],
        "attn_scale": scale,
        "dropout": 0.0,
        "qkv_layout": "_".join([fmt] * 3),
        "attn_bias_type": "no_bias",
        "attn_mask_type": mask,
        "window_size": _window(causal),
    } | extra


def _bshd_cu_seqlens(q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
    b, sq, sk = q.shape[0], q.shape[1], k.shape[1]
    step = lambda s: torch.arange(0, (b + 1) * s, s, dtype=torch.int32, device=q.device)
    return step(sq), step(sk)


def _te_forward(fmt: str, q, k, v, cu_q, cu_k, max_q, max_k, scale, causal):
    fused = importlib.import_module(_TE_FUSED)
    result = call_with_accepted(
        fused.fused_attn_fwd,
        {"is_training": True, "q": q, "k": k, "v": v}
        | _te_common(fmt, q, cu_q, cu_k, max_q, max_k, scale, causal)
        | _te_layout_args(fmt, False, q.dtype),
    )
    if len(result) < 2 or not result[1]:
        raise RuntimeError("te_fused fused_attn_fwd returned no softmax statistics")
    return result[0], result[1][0]


def _te_backward(fmt: str, dout, q, k, v, out, stats, cu_q, cu_k, max_q, max_k, scale, causal):
    fused = importlib.import_module(_TE_FUSED)
    # Without dropout the rng state is never read, but the kernel expects the slot.
    rng_state = torch.zeros(2, dtype=torch.int64, device=q.device)
    grads = call_with_accepted(
        fused.fused_attn_bwd,
        {
            "q": q,
            "k": k,
            "v": v,
            "o": out.to(q.dtype).contiguous(),
            "d_o": dout.to(q.dtype).contiguous(),
            "aux_ctx_tensors": [stats, rng_state],
        }
        | _te_common(fmt, q, cu_q, cu_k, max_q, max_k, scale, causal)
        | _te_layout_args(fmt, True, q.dtype),
    )
    dq, dk, dv = grads[0], grads[1], grads[2]
    _check_grads("te_fused", "fused_attn_bwd", q, k, v, dq, dk, dv)
    return dq, dk, dv


def te_fused_forward(q, k, v, scale, causal):
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    b, sq, hq, _ = q.shape
    cu_q, cu_k = _bshd_cu_seqlens(q, k)
    out, stats = _te_forward("bshd", q, k, v, cu_q, cu_k, sq, k.shape[1], scale, causal)
    check_result(
        "te_fused",
        "fused_attn_fwd",
        {"q": q, "k": k, "out": out, "softmax_stats": stats},
        {"out": (q.shape, q.dtype), "softmax_stats": ((b, hq, sq, 1), torch.float32)},
    )
    return out, stats.squeeze(-1)


def te_fused_backward(dout, q, k, v, out, lse, scale, causal):
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    cu_q, cu_k = _bshd_cu_seqlens(q, k)
    stats = lse.float().unsqueeze(-1).contiguous()  # [b, h, sq, 1]
    return _te_backward(
        "bshd", dout, q, k, v, out, stats, cu_q, cu_k, q.shape[1], k.shape[1], scale, causal
    )


def _te_stats_rows(tokens: int) -> int:
    """Rows of TE's ragged ``thd`` softmax stats: TE 2.8–2.10 round the token count up (1024,
    then powers of two up to 32768, then multiples of 32768); 2.11+ use it as is."""
    if te_version() >= (2, 11):
        return tokens
    if tokens <= 1024:
        return 1024
    if tokens <= 32768:
        return 1 << math.ceil(math.log2(tokens))
    return -(-tokens // 32768) * 32768


def te_fused_varlen_forward(q, k, v, cu_q, cu_k, max_q, max_k, scale, causal):
    tq, hq, _ = q.shape
    out, stats = _te_forward("thd", q, k, v, cu_q, cu_k, max_q, max_k, scale, causal)
    check_result(
        "te_fused",
        "fused_attn_fwd (thd)",
        {"q": q, "k": k, "out": out, "softmax_stats": stats},
        {
            "out": (q.shape, q.dtype),
            "softmax_stats": ((_te_stats_rows(tq), hq, 1), torch.float32),
        },
    )
    return out, stats[:tq, :, 0].transpose(0, 1).contiguous()


def te_fused_varlen_backward(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, scale, causal):
    tq, hq, _ = q.shape
    stats = lse.new_zeros((_te_stats_rows(tq), hq, 1), dtype=torch.float32)
    stats[:tq, :, 0] = lse.transpose(0, 1)
    return _te_backward("thd", dout, q, k, v, out, stats, cu_q, cu_k, max_q, max_k, scale, causal)
