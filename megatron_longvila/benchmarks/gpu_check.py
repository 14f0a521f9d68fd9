"""One command for a lent GPU: do the attention kernels hold, and how fast are they?

``python tools/gpu_check.py --out runs/gpu_check`` (``make gpu-check``) runs every check of
:data:`CHECKS` on one GPU and writes ``gpu_check.json`` and ``gpu_check.md``; it exits 1 when an
equality check fails. Without a GPU it says so, prints the plan and exits 0.

Equality checks compare each GPU backend (flash-attn, Transformer Engine) in bf16 and fp16
against the fp32 math kernel on the same rounded inputs — out, lse, dq, dk, dv — with the
tolerances of Transformer Engine's context-parallel tests (``|got − ref| ≤ atol + rtol·|ref|``,
atol = rtol = 2.5e-2 for bf16, 3.5e-2 for bf16 with GQA, 5e-3 for fp16). The same functions
back the ``gpu``-marked tests of ``tests/test_gpu_check.py``.

:data:`CHECKS` is the plan: a list of :class:`Check`. Checks beyond the kernels (a model step
under the Transformer Engine layer spec against the local spec) are appended to it.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import statistics
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch

from megatron_longvila.benchmarks.report import save_json_and_markdown
from megatron_longvila.benchmarks.spec_step import GPT_7B_4_LAYERS, SEQ, spec_step
from megatron_longvila.core.sequence_parallel import kernels
from megatron_longvila.core.sequence_parallel.rectangles import plan_rectangles
from megatron_longvila.core.sequence_parallel.ring import simulated_ring_attention

Row = dict[str, Any]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
RESULTS = ("out", "lse", "dq", "dk", "dv")


@dataclass(frozen=True)
class Check:
    """``run(device) -> rows``; an equality check's rows carry ``status`` pass/fail/refused."""

    name: str
    what: str
    run: Callable[[torch.device], list[Row]]
    equality: bool = True


def tolerance(dtype: torch.dtype, heads: int, kv_heads: int) -> float:
    """atol = rtol of Transformer Engine's CP tests for ``dtype`` (GQA looser in bf16)."""
    if dtype == torch.float16:
        return 5e-3
    return 2.5e-2 if heads == kv_heads else 3.5e-2


# --------------------------------------------------------------------------------------------
# Comparing one run against the fp32 math kernel
# --------------------------------------------------------------------------------------------


def _inputs(b, sq, sk, heads, kv_heads, head_dim, dtype, device, seed=0):
    """q, k, v, dout drawn in fp32 and rounded to ``dtype`` (the reference sees the same)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    query, key = (b, sq, heads, head_dim), (b, sk, kv_heads, head_dim)
    drawn = [torch.randn(shape, generator=gen) for shape in (query, key, key, query)]
    return [t.to(device=device, dtype=dtype) for t in drawn]


def _errors(got: Iterable[torch.Tensor], want: Iterable[torch.Tensor], tol: float) -> Row:
    """Per result: max |got − ref| and the worst ratio to ``tol + tol·|ref|`` (≤ 1 passes);
    lse where finite."""
    row: Row = {}
    worst = 0.0
    for name, g, w in zip(RESULTS, got, want):
        g, w = g.float(), w.float()
        if name == "lse":
            finite = torch.isfinite(w)
            if not torch.equal(finite, torch.isfinite(g)):
                row["lse"], worst = float("inf"), float("inf")
                continue
            g, w = g[finite], w[finite]
        diff = (g - w).abs()
        row[name] = diff.max().item() if diff.numel() else 0.0
        if diff.numel():
            worst = max(worst, (diff / (tol + tol * w.abs())).max().item())
    row["worst_ratio"] = worst
    row["status"] = "pass" if worst <= 1.0 else "fail"
    return row


def _dense(q, k, v, dout, causal, scale):
    out, lse = kernels.block_forward(q, k, v, scale=scale, causal=causal)
    return out, lse, *kernels.block_backward(dout, q, k, v, out, lse, scale=scale, causal=causal)


def _reference_dense(q, k, v, dout, causal, scale, mask=None):
    """fp32 math kernel on the (rounded) inputs."""
    q, k, v, dout = (t.float() for t in (q, k, v, dout))
    with kernels.forced_backend("math"):
        out, lse = kernels.block_forward(q, k, v, scale=scale, causal=causal, mask=mask)
        grads = kernels.block_backward(
            dout, q, k, v, out, lse, scale=scale, causal=causal, mask=mask
        )
    return out, lse, *grads


def _installed() -> list[str]:
    return [b for b in kernels.GPU_BACKENDS if b in kernels.available_backends()]


def _not_installed_rows(check: str) -> list[Row]:
    return [
        {"check": check, "backend": b, "status": "not installed"}
        for b in kernels.GPU_BACKENDS
        if b not in kernels.available_backends()
    ]


# --------------------------------------------------------------------------------------------
# The checks
# --------------------------------------------------------------------------------------------


def versions(device: torch.device) -> list[Row]:
    """torch, CUDA, cuDNN, flash-attn, Transformer Engine, the GPU."""

    def version(module: str) -> str:
        try:
            return importlib.import_module(module).__version__
        except Exception as error:  # not installed, or broken
            return f"not importable ({type(error).__name__})"

    return [
        {
            "gpu": torch.cuda.get_device_name(device),
            "capability": ".".join(map(str, torch.cuda.get_device_capability(device))),
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version(),
            "flash_attn": version("flash_attn"),
            "transformer_engine": version("transformer_engine"),
            "backends": list(kernels.available_backends()),
        }
    ]


# (case, causal, sq, sk, heads, kv_heads)
DENSE_CASES = (
    ("causal 8:2", True, 512, 512, 8, 2),
    ("causal 8:8", True, 512, 512, 8, 8),
    ("unmasked sq≠sk 8:2", False, 256, 768, 8, 2),
)
HEAD_DIMS = (64, 128)
ODD_HEAD_DIM = (
    100  # not a multiple of 8: GPU kernels must refuse it, the automatic choice falls back
)


def backend_equality(device: torch.device) -> list[Row]:
    """Every installed GPU backend × bf16/fp16 × head dim 64/128 × causal/GQA/sq≠sk blocks."""
    rows = _not_installed_rows("backends")
    for backend in _installed():
        for dtype_name, dtype in DTYPES.items():
            for head_dim in HEAD_DIMS:
                for case, causal, sq, sk, heads, kv_heads in DENSE_CASES:
                    inputs = _inputs(2, sq, sk, heads, kv_heads, head_dim, dtype, device)
                    scale = head_dim**-0.5
                    with kernels.forced_backend(backend):
                        got = _dense(*inputs, causal, scale)
                    want = _reference_dense(*inputs, causal, scale)
                    rows.append(
                        {
                            "check": "backends",
                            "backend": backend,
                            "dtype": dtype_name,
                            "case": f"{case}, d={head_dim}",
                        }
                        | _errors(got, want, tolerance(dtype, heads, kv_heads))
                    )
            rows.append(_odd_head_dim_row(backend, dtype_name, dtype, device))
    return rows


def _odd_head_dim_row(backend: str, dtype_name: str, dtype, device) -> Row:
    """Forced, the backend refuses the head dim naming it; chosen automatically, the block
    falls back to another kernel and stays exact."""
    q, k, v, dout = _inputs(1, 128, 128, 4, 4, ODD_HEAD_DIM, dtype, device)
    row = {"check": "backends", "backend": backend, "dtype": dtype_name}
    row["case"] = f"d={ODD_HEAD_DIM}: forced refuses, automatic falls back"
    try:
        with kernels.forced_backend(backend):
            kernels.block_forward(q, k, v, scale=0.1, causal=True)
        return row | {"status": "fail", "detail": "forced backend did not refuse"}
    except ValueError as error:
        message = str(error)
    named = all(s in message for s in (backend, str(dtype), f"head_dim {ODD_HEAD_DIM}"))
    fallback = kernels.select_backend(q)
    errors = _errors(
        _dense(q, k, v, dout, True, 0.1),
        _reference_dense(q, k, v, dout, True, 0.1),
        tolerance(dtype, 4, 4),
    )
    status = "refused" if named and errors["status"] == "pass" else "fail"
    return row | errors | {"status": status, "detail": f"fallback {fallback}: {message}"}


# Segments of a 1024-token block: one crossing most of it, one of length 1, padding at the end.
PACKED_SEGMENTS = [0] * 100 + [1] * 600 + [2] + [3] * 283 + [-1] * 40


def rectangles_equality(device: torch.device) -> list[Row]:
    """Packed rectangles through flash-attn varlen / TE thd (one call per group) against the
    fp32 math kernel with the explicit mask: a causal diagonal block and a non-causal one."""
    rows = _not_installed_rows("rectangles")
    segments = torch.tensor([PACKED_SEGMENTS, list(reversed(PACKED_SEGMENTS))])
    seq = segments.shape[1]
    for backend in _installed():
        for dtype_name, dtype in DTYPES.items():
            for causal in (True, False):
                q, k, v, dout = _inputs(2, seq, seq, 8, 2, 128, dtype, device)
                plan = plan_rectangles(segments, segments, causal=causal)
                with kernels.forced_backend(backend):
                    out, lse = kernels.rectangles_forward(q, k, v, plan, scale=128**-0.5)
                    grads = kernels.rectangles_backward(
                        dout, q, k, v, out, lse, plan, scale=128**-0.5
                    )
                allowed = (segments[:, :, None] == segments[:, None, :]) & (
                    segments[:, :, None] >= 0
                )
                if causal:
                    allowed &= torch.ones(seq, seq, dtype=torch.bool).tril()
                want = _reference_dense(q, k, v, dout, False, 128**-0.5, mask=allowed.to(device))
                rows.append(
                    {
                        "check": "rectangles",
                        "backend": backend,
                        "dtype": dtype_name,
                        "case": f"{'diagonal (causal)' if causal else 'unmasked'}, "
                        f"{len(plan.rectangles)} rectangles in {len(plan.passes)} calls",
                    }
                    | _errors((out, lse, *grads), want, tolerance(dtype, 8, 2))
                )
    return rows


RING_SHAPE = (2048, 8, 2, 128)  # sequence, heads, kv heads, head dim


def ring_equality(device: torch.device) -> list[Row]:
    """The ring's block plan on one GPU (:func:`simulated_ring_attention`): a two-block merge
    (R = 2, unmasked, each block's backward fed the merged out/lse) and zigzag rings of R = 4
    and 8 (causal), against one fp32 math call over the whole sequence."""
    rows = _not_installed_rows("ring")
    seq, heads, kv_heads, head_dim = RING_SHAPE
    scale = head_dim**-0.5
    cases = (("two-block merge", 2, "contiguous", False), ("zigzag R=4", 4, "zigzag", True))
    cases += (("zigzag R=8", 8, "zigzag", True),)
    for backend in _installed():
        for dtype_name, dtype in DTYPES.items():
            q, k, v, dout = _inputs(1, seq, seq, heads, kv_heads, head_dim, dtype, device)
            for case, ring, layout, causal in cases:
                with kernels.forced_backend(backend):
                    got = simulated_ring_attention(
                        q, k, v, ring, dout=dout, causal=causal, layout=layout, scale=scale
                    )
                want = _reference_dense(q, k, v, dout, causal, scale)
                rows.append(
                    {"check": "ring", "backend": backend, "dtype": dtype_name, "case": case}
                    | _errors(got, want, tolerance(dtype, heads, kv_heads))
                )
    return rows


THROUGHPUT_SEQS = (32768, 65536)
THROUGHPUT_RING = 8


def _median_ms(fn: Callable[[], Any], repeats: int = 3) -> float:
    fn()  # warm-up (kernel selection, allocator)
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def _monolithic(q, k, v, dout, scale):
    if dout is None:
        return kernels.block_forward(q, k, v, scale=scale, causal=True)
    return _dense(q, k, v, dout, True, scale)


def _ring(q, k, v, dout, scale):
    return simulated_ring_attention(q, k, v, THROUGHPUT_RING, dout=dout, scale=scale)


def throughput(device: torch.device, seqs: tuple[int, ...] = THROUGHPUT_SEQS) -> list[Row]:
    """Causal attention, 28:4 heads, d = 128, bf16: one monolithic call against the blocked
    zigzag ring loop of R = 8 on the same GPU; forward and forward + backward, TFLOP/s
    (forward 2·S²·d·h causal, backward 2.5× that) and the ring's share of the monolithic rate."""
    rows = _not_installed_rows("throughput")
    heads, kv_heads, head_dim = 28, 4, 128
    scale = head_dim**-0.5
    for backend in _installed():
        for seq in seqs:
            q, k, v, dout = _inputs(1, seq, seq, heads, kv_heads, head_dim, torch.bfloat16, device)
            forward_flops = 2 * seq * seq * head_dim * heads
            with kernels.forced_backend(backend):
                timed = {
                    "monolithic": (
                        _median_ms(partial(_monolithic, q, k, v, None, scale)),
                        _median_ms(partial(_monolithic, q, k, v, dout, scale)),
                    ),
                    f"ring R={THROUGHPUT_RING}": (
                        _median_ms(partial(_ring, q, k, v, None, scale)),
                        _median_ms(partial(_ring, q, k, v, dout, scale)),
                    ),
                }
            base = timed["monolithic"]
            for kind, (fwd_ms, fwd_bwd_ms) in timed.items():
                rows.append(
                    {
                        "check": "throughput",
                        "backend": backend,
                        "seq": seq,
                        "kind": kind,
                        "forward_ms": fwd_ms,
                        "forward_backward_ms": fwd_bwd_ms,
                        "forward_tflops": forward_flops / fwd_ms / 1e9,
                        "forward_backward_tflops": 3.5 * forward_flops / fwd_bwd_ms / 1e9,
                        "forward_backward_vs_monolithic": base[1] / fwd_bwd_ms,
                    }
                )
            del q, k, v, dout
            torch.cuda.empty_cache()
    return rows


#: The plan, in order. Checks of whole model steps are appended here.
CHECKS: list[Check] = [
    Check("versions", "torch, CUDA, cuDNN, flash-attn, Transformer Engine, GPU", versions, False),
    Check(
        "backends",
        "each GPU backend × bf16/fp16 × d 64/128 vs fp32 math: causal 8:2 and 8:8, unmasked "
        f"sq≠sk; d={ODD_HEAD_DIM} refused when forced, falls back when chosen",
        backend_equality,
    ),
    Check(
        "rectangles",
        "packed rectangles through flash-attn varlen / TE thd vs fp32 math with the mask",
        rectangles_equality,
    ),
    Check(
        "ring",
        "two-block merge by lse; zigzag rings R=4 and 8 (block plan on one GPU) vs one call",
        ring_equality,
    ),
    Check(
        "throughput",
        f"S={'/'.join(f'{s // 1024}k' for s in THROUGHPUT_SEQS)}, 28:4 heads, d=128, bf16: "
        f"monolithic causal call vs ring loop R={THROUGHPUT_RING} (TFLOP/s, ratio)",
        throughput,
        False,
    ),
    Check(
        "spec_step",
        f"{GPT_7B_4_LAYERS.num_layers}-layer Qwen2-7B-shaped LLM step, {SEQ // 1024}k tokens, "
        "bf16: Transformer Engine layer spec vs local spec (tokens/s, MFU)",
        spec_step,
        False,
    ),
]


# --------------------------------------------------------------------------------------------
# Running and reporting
# --------------------------------------------------------------------------------------------


def plan_text(checks: list[Check] = CHECKS) -> str:
    return "\n".join(f"  {c.name:<12} {c.what}" for c in checks)


def run_checks(device: torch.device, checks: list[Check] = CHECKS) -> dict[str, Any]:
    """Every check on ``device``; a check that raises is recorded as an error row."""
    result: dict[str, Any] = {"date": datetime.datetime.now().isoformat(timespec="minutes")}
    for check in checks:
        try:
            result[check.name] = check.run(device)
        except Exception as error:  # one broken check must not hide the others
            result[check.name] = [{"check": check.name, "status": "error", "detail": repr(error)}]
        torch.cuda.empty_cache()
    return result


def failures(result: dict[str, Any], checks: list[Check] = CHECKS) -> list[Row]:
    return [
        row
        for check in checks
        for row in result.get(check.name, [])
        if row.get("status") in ("fail", "error")
    ]


def markdown(result: dict[str, Any]) -> str:
    lines = [f"# GPU check ({result['date']})", ""]
    if result.get("versions"):
        (v,) = result["versions"]
        lines += [
            "| GPU | capability | torch | CUDA | cuDNN | flash-attn | Transformer Engine |",
            "|---|---|---|---|---|---|---|",
            f"| {v['gpu']} | {v['capability']} | {v['torch']} | {v['cuda']} | {v['cudnn']} "
            f"| {v['flash_attn']} | {v['transformer_engine']} |",
            "",
        ]
    equality = [r for c in CHECKS if c.equality for r in result.get(c.name, [])]
    if equality:
        lines += [
            "| check | backend | dtype | case | out | lse | dq | dk | dv | worst/tol | status |",
            "|---|---|---|---|---:|---:|---:|---:|---:|---:|---|",
        ]
        for r in equality:
            errors = " | ".join(f"{r[n]:.1e}" if n in r else "–" for n in RESULTS)
            ratio = f"{r['worst_ratio']:.2f}" if "worst_ratio" in r else "–"
            lines.append(
                f"| {r['check']} | {r.get('backend', '–')} | {r.get('dtype', '–')} "
                f"| {r.get('case', r.get('detail', ''))} | {errors} | {ratio} | {r['status']} |"
            )
        lines.append("")
    speed = [r for r in result.get("throughput", []) if "seq" in r]
    if speed:
        lines += [
            "| backend | S | kind | fwd ms | fwd TFLOP/s | fwd+bwd ms | fwd+bwd TFLOP/s "
            "| vs monolithic |",
            "|---|---:|---|---:|---:|---:|---:|---:|",
        ]
        for r in speed:
            lines.append(
                f"| {r['backend']} | {r['seq']} | {r['kind']} | {r['forward_ms']:.1f} "
                f"| {r['forward_tflops']:.0f} | {r['forward_backward_ms']:.1f} "
                f"| {r['forward_backward_tflops']:.0f} "
                f"| {r['forward_backward_vs_monolithic']:.2f} |"
            )
    steps = [r for r in result.get("spec_step", []) if "step_ms" in r]
    if steps:
        lines += [
            "",
            "| layer spec | layers | S | dtype | step ms | tokens/s | TFLOP/s | MFU |",
            "|---|---:|---:|---|---:|---:|---:|---:|",
        ]
        for r in steps:
            mfu = "–" if r["mfu"] is None else f"{r['mfu']:.1%}"
            lines.append(
                f"| {r['spec']} | {r['layers']} | {r['seq']} | {r['dtype']} | {r['step_ms']:.1f} "
                f"| {r['tokens_per_s']:.0f} | {r['model_tflops']:.0f} | {mfu} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/gpu_check"))
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu-check: no GPU here (torch.cuda.is_available() is False); on a GPU it runs:")
        print(plan_text())
        return 0
    device = torch.device("cuda", torch.cuda.current_device())
    print(f"gpu-check on {torch.cuda.get_device_name(device)}:\n{plan_text()}")
    result = run_checks(device)
    text = markdown(result)
    save_json_and_markdown(args.out, "gpu_check", result, text)
    print(text)
    failed = failures(result)
    for row in failed:
        print(f"FAILED: {row}")
    return 1 if failed else 0
