"""Stand-ins for flash-attn and Transformer Engine that run on CPU tensors.

Each fake entry point has the parameter list of the real one in the named release (copied from
its source: flash-attn v2.6.3 and v2.8.3 ``flash_attn_interface.py``, Transformer Engine 2.8.0
and 2.20.2 ``cpp_extensions/fused_attn.py``), returns what the real one returns, and lays its
outputs out as the real one does for the layout arguments it is given (TE 2.15+ returns ``sbhd``
outputs unless told otherwise). The arithmetic is plain float64 attention. With them the
adapters' argument names, layouts, return handling and shape checks run without a GPU.

``install(monkeypatch, library, version)`` puts the modules in ``sys.modules`` and makes
:mod:`kernels` see a CUDA device of compute capability 9.0 with cuDNN 9.7.
"""

from __future__ import annotations

import enum
import itertools
import math
import sys
import types

import torch

from megatron_longvila.core.sequence_parallel import kernels

HALF = (torch.float16, torch.bfloat16)

# --------------------------------------------------------------------------------------------
# float64 attention with the two causal alignments the libraries use
# --------------------------------------------------------------------------------------------


def _allowed(sq: int, sk: int, causal: bool, bottom_right: bool) -> torch.Tensor:
    if not causal:
        return torch.ones(sq, sk, dtype=torch.bool)
    offset = sk - sq if bottom_right else 0
    return torch.ones(sq, sk, dtype=torch.bool).tril(offset)


def _scores(q, k, scale, causal, bottom_right):
    """q: [sq, h, d], k: [sk, hkv, d] -> float64 [h, sq, sk] (masked -inf)."""
    repeat = q.shape[1] // k.shape[1]
    kr = k.double().repeat_interleave(repeat, 1)
    s = torch.einsum("qhd,khd->hqk", q.double(), kr) * scale
    return s.masked_fill(~_allowed(q.shape[0], k.shape[0], causal, bottom_right), float("-inf"))


def attend(q, k, v, scale, causal, bottom_right):
    """One sequence: q [sq, h, d], k/v [sk, hkv, d] -> (out [sq, h, d] like q, lse [h, sq])."""
    s = _scores(q, k, scale, causal, bottom_right)
    lse = torch.logsumexp(s, -1)
    probs = torch.exp(s - lse[..., None])
    repeat = q.shape[1] // k.shape[1]
    out = torch.einsum("hqk,khd->qhd", probs, v.double().repeat_interleave(repeat, 1))
    return out.to(q.dtype), lse.float()


def attend_backward(dout, q, k, v, out, lse, scale, causal, bottom_right):
    """Gradients of one sequence from the given (merged) out and lse."""
    repeat = q.shape[1] // k.shape[1]
    kr, vr = (t.double().repeat_interleave(repeat, 1) for t in (k, v))
    probs = torch.exp(_scores(q, k, scale, causal, bottom_right) - lse.double()[..., None])
    do, o = dout.double(), out.double()
    dv = torch.einsum("hqk,qhd->khd", probs, do)
    dp = torch.einsum("qhd,khd->hqk", do, vr)
    ds = probs * (dp - (do * o).sum(-1).T[..., None])
    dq = torch.einsum("hqk,khd->qhd", ds, kr) * scale
    dk = torch.einsum("hqk,qhd->khd", ds, q.double()) * scale

    def fold(g):  # sum the gradients of the query heads that share a kv head
        return g.view(g.shape[0], k.shape[1], repeat, g.shape[-1]).sum(2)

    return dq.to(q.dtype), fold(dk).to(k.dtype), fold(dv).to(v.dtype)


def _check_half(*tensors):
    dtypes = {t.dtype for t in tensors}
    assert len(dtypes) == 1 and dtypes <= set(HALF), f"fp16/bf16 only, got {dtypes}"
    assert tensors[0].shape[-1] % 8 == 0, "head dim must be a multiple of 8"


def _sequences(cu: torch.Tensor) -> list[slice]:
    assert cu.dtype == torch.int32, f"cu_seqlens must be int32, got {cu.dtype}"
    bounds = cu.tolist()
    return [slice(a, z) for a, z in itertools.pairwise(bounds)]


def _dense(q, k, v, scale, causal, bottom_right):
    """[b, s, h, d] batches -> (out [b, sq, h, d], lse [b, h, sq])."""
    parts = [attend(q[i], k[i], v[i], scale, causal, bottom_right) for i in range(q.shape[0])]
    return torch.stack([o for o, _ in parts]), torch.stack([lse for _, lse in parts])


def _dense_backward(dout, q, k, v, out, lse, scale, causal, bottom_right):
    parts = [
        attend_backward(dout[i], q[i], k[i], v[i], out[i], lse[i], scale, causal, bottom_right)
        for i in range(q.shape[0])
    ]
    return tuple(torch.stack([p[j] for p in parts]) for j in range(3))


def _varlen(q, k, v, cu_q, cu_k, scale, causal, bottom_right):
    """thd -> (out [tq, h, d], lse [h, tq])."""
    parts = [
        attend(q[a], k[c], v[c], scale, causal, bottom_right)
        for a, c in zip(_sequences(cu_q), _sequences(cu_k))
    ]
    return torch.cat([o for o, _ in parts]), torch.cat([lse for _, lse in parts], dim=1)


def _varlen_backward(dout, q, k, v, out, lse, cu_q, cu_k, scale, causal, bottom_right):
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    for a, c in zip(_sequences(cu_q), _sequences(cu_k)):
        gq, gk, gv = attend_backward(
            dout[a], q[a], k[c], v[c], out[a], lse[:, a], scale, causal, bottom_right
        )
        dq[a], dk[c], dv[c] = gq, gk, gv
    return dq, dk, dv


# --------------------------------------------------------------------------------------------
# flash-attn: 2.6.3 (plain functions, window tuple, 8 results) and 2.8.3 (custom ops)
# --------------------------------------------------------------------------------------------


def _flash_causal(causal, left, right):
    assert (left, right) in ((-1, -1), (-1, 0)), f"unexpected window ({left}, {right})"
    return causal  # the C++ sets right = 0 whenever causal; no other window is used here


def _flash_263() -> types.ModuleType:
    def _flash_attn_forward(
        q,
        k,
        v,
        dropout_p,
        softmax_scale,
        causal,
        window_size,
        softcap,
        alibi_slopes,
        return_softmax,
    ):
        _check_half(q, k, v)
        out, lse = _dense(q, k, v, softmax_scale, _flash_causal(causal, *window_size), True)
        return out, q, k, v, out, lse, None, torch.zeros(2, dtype=torch.int64)

    def _flash_attn_varlen_forward(
        q,
        k,
        v,
        cu_seqlens_q,
        cu_seqlens_k,
        max_seqlen_q,
        max_seqlen_k,
        dropout_p,
        softmax_scale,
        causal,
        window_size=(-1, -1),
        softcap=0.0,
        alibi_slopes=None,
        return_softmax=False,
        block_table=None,
        leftpad_k=None,
        seqused_k=None,
    ):
        _check_half(q, k, v)
        causal = _flash_causal(causal, *window_size)
        out, lse = _varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, softmax_scale, causal, True)
        return out, q, k, v, out, lse, None, torch.zeros(2, dtype=torch.int64)

    def _flash_attn_backward(
        dout,
        q,
        k,
        v,
        out,
        softmax_lse,
        dq,
        dk,
        dv,
        dropout_p,
        softmax_scale,
        causal,
        window_size,
        softcap,
        alibi_slopes,
        deterministic,
        rng_state=None,
    ):
        _check_half(dout, q, k, v, out)
        causal = _flash_causal(causal, *window_size)
        grads = _dense_backward(dout, q, k, v, out, softmax_lse, softmax_scale, causal, True)
        for buffer, g in zip((dq, dk, dv), grads):
            buffer.copy_(g)
        return dq, dk, dv, None

    def _flash_attn_varlen_backward(
        dout,
        q,
        k,
        v,
        out,
        softmax_lse,
        dq,
        dk,
        dv,
        cu_seqlens_q,
        cu_seqlens_k,
        max_seqlen_q,
        max_seqlen_k,
        dropout_p,
        softmax_scale,
        causal,
        window_size,
        softcap,
        alibi_slopes,
        deterministic,
        rng_state=None,
    ):
        _check_half(dout, q, k, v, out)
        causal = _flash_causal(causal, *window_size)
        grads = _varlen_backward(
            dout, q, k, v, out, softmax_lse, cu_seqlens_q, cu_seqlens_k, softmax_scale, causal, True
        )
        for buffer, g in zip((dq, dk, dv), grads):
            buffer.copy_(g)
        return dq, dk, dv, None

    return _module("flash_attn.flash_attn_interface", locals())


class _CustomOp:
    """Like torch.library's CustomOpDef: called with anything, its Python function in
    ``_init_fn`` (so only an adapter that inspects ``_init_fn`` learns the parameters)."""

    def __init__(self, fn):
        self._init_fn = fn

    def __call__(self, *args, **kwargs):
        return self._init_fn(*args, **kwargs)


def _flash_283() -> types.ModuleType:
    def _flash_attn_forward(
        q,
        k,
        v,
        dropout_p,
        softmax_scale,
        causal,
        window_size_left,
        window_size_right,
        softcap,
        alibi_slopes,
        return_softmax,
    ):
        _check_half(q, k, v)
        causal = _flash_causal(causal, window_size_left, window_size_right)
        out, lse = _dense(q, k, v, softmax_scale, causal, True)
        return out, lse, torch.empty(0, dtype=q.dtype), torch.zeros(2, dtype=torch.int64)

    def _flash_attn_varlen_forward(
        q,
        k,
        v,
        cu_seqlens_q,
        cu_seqlens_k,
        max_seqlen_q,
        max_seqlen_k,
        dropout_p,
        softmax_scale,
        causal,
        window_size_left=-1,
        window_size_right=-1,
        softcap=0.0,
        alibi_slopes=None,
        return_softmax=False,
        block_table=None,
        leftpad_k=None,
        seqused_k=None,
        zero_tensors=False,
    ):
        _check_half(q, k, v)
        causal = _flash_causal(causal, window_size_left, window_size_right)
        out, lse = _varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, softmax_scale, causal, True)
        return out, lse, torch.empty(0, dtype=q.dtype), torch.zeros(2, dtype=torch.int64)

    def _flash_attn_backward(
        dout,
        q,
        k,
        v,
        out,
        softmax_lse,
        dq,
        dk,
        dv,
        dropout_p,
        softmax_scale,
        causal,
        window_size_left,
        window_size_right,
        softcap,
        alibi_slopes,
        deterministic,
        rng_state=None,
    ):
        _check_half(dout, q, k, v, out)
        causal = _flash_causal(causal, window_size_left, window_size_right)
        grads = _dense_backward(dout, q, k, v, out, softmax_lse, softmax_scale, causal, True)
        for buffer, g in zip((dq, dk, dv), grads):
            buffer.copy_(g)
        return torch.empty(0)

    def _flash_attn_varlen_backward(
        dout,
        q,
        k,
        v,
        out,
        softmax_lse,
        dq,
        dk,
        dv,
        cu_seqlens_q,
        cu_seqlens_k,
        max_seqlen_q,
        max_seqlen_k,
        dropout_p,
        softmax_scale,
        causal,
        window_size_left,
        window_size_right,
        softcap,
        alibi_slopes,
        deterministic,
        rng_state=None,
        zero_tensors=False,
    ):
        _check_half(dout, q, k, v, out)
        causal = _flash_causal(causal, window_size_left, window_size_right)
        grads = _varlen_backward(
            dout, q, k, v, out, softmax_lse, cu_seqlens_q, cu_seqlens_k, softmax_scale, causal, True
        )
        for buffer, g in zip((dq, dk, dv), grads):
            buffer.copy_(g)
        return torch.empty(0)

    defined = dict(locals())
    functions = {name: _CustomOp(fn) for name, fn in defined.items() if name.startswith("_flash")}
    return _module("flash_attn.flash_attn_interface", functions)


# --------------------------------------------------------------------------------------------
# Transformer Engine fused attention: 2.8.0 and 2.20.2
# --------------------------------------------------------------------------------------------


def _max_tokens(t: int) -> int:
    """TE 2.8–2.10 ``get_max_tokens``."""
    log2 = math.ceil(math.log2(t))
    return 1024 if log2 <= 10 else 2**log2 if log2 <= 15 else -(-t // 32768) * 32768


class _TE:
    """The arithmetic both fake TE releases share; ``ragged_rows`` sizes thd stats."""

    def __init__(self, ragged_rows):
        self.ragged_rows = ragged_rows

    @staticmethod
    def _mask(attn_mask_type, window_size, fmt):
        masks = {"bshd": ("no_mask", "causal"), "thd": ("padding", "padding_causal")}[fmt]
        assert attn_mask_type in masks, f"fake takes {masks} with {fmt}, got {attn_mask_type!r}"
        causal = attn_mask_type == masks[1]
        # cuDNN 9.2–9.5 accept causal masks only with window (-1, 0).
        assert tuple(window_size) == ((-1, 0) if causal else (-1, -1)), window_size
        return causal

    @staticmethod
    def _format(qkv_layout):
        formats = {"bshd_bshd_bshd": "bshd", "thd_thd_thd": "thd"}
        assert qkv_layout in formats, f"fake supports bshd/thd layouts, got {qkv_layout!r}"
        return formats[qkv_layout]

    def forward(self, q, k, v, cu_q, cu_k, fake_dtype, attn_scale, layout, mask, window, o_format):
        _check_half(q, k, v)
        assert fake_dtype == q.dtype
        fmt = self._format(layout)
        causal = self._mask(mask, window, fmt)
        scale = attn_scale if attn_scale is not None else q.shape[-1] ** -0.5
        if fmt == "thd":
            out, lse = _varlen(q, k, v, cu_q, cu_k, scale, causal, False)
            stats = torch.full((self.ragged_rows(q.shape[0]), q.shape[1], 1), float("nan"))
            stats[: q.shape[0], :, 0] = lse.T
            assert o_format == "thd", f"thd output asked as {o_format}"
        else:
            out, lse = _dense(q, k, v, scale, causal, False)
            stats = lse.unsqueeze(-1)
            if o_format == "sbhd":
                out = out.transpose(0, 1).contiguous()
        return out, [stats, torch.zeros(2, dtype=torch.int64)]

    def backward(self, q, k, v, o, d_o, aux, attn_scale, layout, mask, window, formats):
        o_format, do_format, dqkv_layout = formats
        _check_half(q, k, v, o, d_o)
        fmt = self._format(layout)
        causal = self._mask(mask, window, fmt)
        scale = attn_scale if attn_scale is not None else q.shape[-1] ** -0.5
        stats = aux[0]  # then the rng state, then the fake's own cu_seqlens
        if o_format == "sbhd" and fmt == "bshd":
            o = o.transpose(0, 1)
        if do_format == "sbhd" and fmt == "bshd":
            d_o = d_o.transpose(0, 1)
        if fmt == "thd":
            rows = self.ragged_rows(q.shape[0])
            assert stats.shape == (rows, q.shape[1], 1), f"thd stats {tuple(stats.shape)}"
            lse = stats[: q.shape[0], :, 0].T
            grads = _varlen_backward(d_o, q, k, v, o, lse, *aux[2:], scale, causal, False)
        else:
            grads = _dense_backward(d_o, q, k, v, o, stats.squeeze(-1), scale, causal, False)
        if dqkv_layout == "sbh3d":  # the default: views into one interleaved [s, b, h, 3, d] buffer
            packed = torch.stack([g.transpose(0, 1) for g in grads], dim=3)
            grads = tuple(packed[:, :, :, i] for i in range(3))
        return [*grads, None, None]


def _te_modules(version: str) -> dict[str, types.ModuleType]:
    new_api = version.startswith("2.20")
    te = _TE(ragged_rows=(lambda t: t) if new_api else _max_tokens)

    if new_api:

        class FusedAttnBackend(enum.IntEnum):
            No_Backend = -1
            F16_arbitrary_seqlen = 1
            FP8 = 2

        def fused_attn_fwd(
            is_training,
            max_seqlen_q,
            max_seqlen_kv,
            cu_seqlens_q,
            cu_seqlens_kv,
            q,
            k,
            v,
            fake_dtype,
            fused_attention_backend,
            attn_bias=None,
            cu_seqlens_q_padded=None,
            cu_seqlens_kv_padded=None,
            page_table_k=None,
            page_table_v=None,
            s_quantizer=None,
            o_quantizer=None,
            attn_scale=None,
            dropout=0.0,
            fast_zero_fill=True,
            qkv_layout="sbh3d",
            o_format="sbhd",
            qkv_scale_inv_format=None,
            attn_bias_type="no_bias",
            attn_mask_type="padding",
            softmax_type="vanilla",
            window_size=(-1, -1),
            bottom_right_diagonal=None,
            rng_gen=None,
            softmax_offset=None,
            return_max_logit=False,
            cuda_graph=False,
        ):
            return te.forward(
                q, k, v, cu_seqlens_q, cu_seqlens_kv, fake_dtype, attn_scale, qkv_layout,
                attn_mask_type, window_size, o_format,
            )  # fmt: skip

        def fused_attn_bwd(
            max_seqlen_q,
            max_seqlen_kv,
            cu_seqlens_q,
            cu_seqlens_kv,
            q,
            k,
            v,
            o,
            d_o,
            fake_dtype,
            aux_ctx_tensors,
            fused_attention_backend,
            cu_seqlens_q_padded=None,
            cu_seqlens_kv_padded=None,
            s_quantizer=None,
            dp_quantizer=None,
            dqkv_quantizer=None,
            attn_scale=None,
            dropout=0.0,
            fast_zero_fill=True,
            qkv_layout="sbh3d",
            o_format="sbhd",
            do_format="sbhd",
            dqkv_layout="sbh3d",
            qkv_scale_inv_format=None,
            do_scale_inv_format=None,
            attn_bias_type="no_bias",
            attn_mask_type="padding",
            softmax_type="vanilla",
            window_size=(-1, -1),
            bottom_right_diagonal=None,
            deterministic=False,
            cuda_graph=False,
        ):
            aux = [*aux_ctx_tensors, cu_seqlens_q, cu_seqlens_kv]
            return te.backward(
                q, k, v, o, d_o, aux, attn_scale, qkv_layout, attn_mask_type, window_size,
                (o_format, do_format, dqkv_layout),
            )  # fmt: skip

    else:
        FusedAttnBackend = {
            "F16_max512_seqlen": 0,
            "F16_arbitrary_seqlen": 1,
            "FP8": 2,
            "No_Backend": 3,
        }

        def fused_attn_fwd(
            is_training,
            max_seqlen_q,
            max_seqlen_kv,
            cu_seqlens_q,
            cu_seqlens_kv,
            q,
            k,
            v,
            fake_dtype,
            fused_attention_backend,
            attn_bias=None,
            cu_seqlens_q_padded=None,
            cu_seqlens_kv_padded=None,
            page_table_k=None,
            page_table_v=None,
            s_quantizer=None,
            o_quantizer=None,
            attn_scale=None,
            dropout=0.0,
            fast_zero_fill=True,
            qkv_layout="sbh3d",
            attn_bias_type="no_bias",
            attn_mask_type="padding",
            softmax_type="vanilla",
            window_size=(-1, -1),
            rng_gen=None,
            softmax_offset=None,
        ):
            fmt = _TE._format(qkv_layout)
            return te.forward(
                q, k, v, cu_seqlens_q, cu_seqlens_kv, fake_dtype, attn_scale, qkv_layout,
                attn_mask_type, window_size, fmt,
            )  # fmt: skip

        def fused_attn_bwd(
            max_seqlen_q,
            max_seqlen_kv,
            cu_seqlens_q,
            cu_seqlens_kv,
            q,
            k,
            v,
            o,
            d_o,
            fake_dtype,
            dqkv_dtype,
            aux_ctx_tensors,
            fused_attention_backend,
            cu_seqlens_q_padded=None,
            cu_seqlens_kv_padded=None,
            s_quantizer=None,
            dp_quantizer=None,
            dqkv_quantizer=None,
            attn_scale=None,
            dropout=0.0,
            fast_zero_fill=True,
            qkv_layout="sbh3d",
            attn_bias_type="no_bias",
            attn_mask_type="padding",
            softmax_type="vanilla",
            window_size=(-1, -1),
            deterministic=False,
        ):
            assert dqkv_dtype == TE_DType[q.dtype], dqkv_dtype
            fmt = _TE._format(qkv_layout)
            aux = [*aux_ctx_tensors, cu_seqlens_q, cu_seqlens_kv]
            return te.backward(
                q, k, v, o, d_o, aux, attn_scale, qkv_layout, attn_mask_type, window_size,
                (fmt, fmt, qkv_layout),
            )  # fmt: skip

    TE_DType = {torch.float16: "kFloat16", torch.bfloat16: "kBFloat16", torch.float32: "kFloat32"}
    package = _module("transformer_engine", {"__version__": version})
    return {
        "transformer_engine": package,
        "transformer_engine.pytorch": _module("transformer_engine.pytorch", {}),
        "transformer_engine.pytorch.cpp_extensions": _module(
            "transformer_engine.pytorch.cpp_extensions", {}
        ),
        "transformer_engine.pytorch.cpp_extensions.fused_attn": _module(
            "transformer_engine.pytorch.cpp_extensions.fused_attn",
            {
                "fused_attn_fwd": fused_attn_fwd,
                "fused_attn_bwd": fused_attn_bwd,
                "FusedAttnBackend": FusedAttnBackend,
            },
        ),
        "transformer_engine.pytorch.constants": _module(
            "transformer_engine.pytorch.constants", {"TE_DType": TE_DType}
        ),
    }


# --------------------------------------------------------------------------------------------
# Installing them
# --------------------------------------------------------------------------------------------


def _module(name: str, attributes: dict) -> types.ModuleType:
    module = types.ModuleType(name)
    for key, value in attributes.items():
        if not key.startswith("__") or key == "__version__":
            setattr(module, key, value)
    return module


FLASH_VERSIONS = ("2.6.3", "2.8.3")
TE_VERSIONS = ("2.8.0", "2.20.2")


def install(monkeypatch, library: str, version: str) -> str:
    """Make ``library`` ("flash_attn" or "te_fused") at ``version`` importable and usable by the
    kernels on CPU tensors; returns the backend name."""
    if library == "flash_attn":
        interface = {"2.6.3": _flash_263, "2.8.3": _flash_283}[version]()
        modules = {
            "flash_attn": _module("flash_attn", {"__version__": version}),
            "flash_attn.flash_attn_interface": interface,
        }
    else:
        modules = _te_modules(version)
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr(kernels, "available_backends", lambda: ("cpu_flash", "math", library))
    monkeypatch.setattr(kernels, "_gpu_capability", lambda t: (9, 0))
    monkeypatch.setattr(kernels, "_cudnn_version", lambda: 90700)
    return library
