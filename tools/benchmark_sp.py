"""Benchmark sequence-parallel attention: ring-only vs Ulysses-only vs 2D (Ulysses × ring).

One run measures attention forward + backward for every ``ulysses × ring`` split of each sp
degree (ring-only ``1×sp``, Ulysses-only ``sp×1`` and the 2D splits in between) through the same
code path (:func:`mmsp_attention`), and writes ``benchmark_sp.json`` and ``benchmark_sp.md``:

* time: median over repeats (warm-up repeats dropped) of the slowest rank's fwd+bwd time;
* bytes: bytes each rank sends, measured by ``comm_stats`` and predicted by its formulas;
* peak memory: bytes of tensors live at once during one fwd+bwd beyond the inputs
  (``torch.cuda.max_memory_allocated`` on GPUs; on CPU a dispatch-level tracker of tensor
  storages, since the CPU allocator keeps no statistics).

Runs under ``torchrun`` (one process per rank), or starts its own gloo ranks::

    python tools/benchmark_sp.py --world 8 --seq 2048 --out runs/benchmark_sp
    torchrun --nproc-per-node 8 tools/benchmark_sp.py --seq 65536 --heads 32 --kv-heads 8
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Settings:
    sp_degrees: tuple[int, ...] = (4, 8)
    batch: int = 1
    seq: int = 2048
    heads: int = 16
    kv_heads: int = 4
    head_dim: int = 64
    causal: bool = True
    dtype: str = "float32"
    repeats: int = 5
    warmup: int = 1
    seed: int = 0


def splits(sp: int) -> list[tuple[int, int]]:
    """All ``(ulysses, ring)`` with ``ulysses × ring = sp``, ring-only first, Ulysses-only last."""
    return [(u, sp // u) for u in range(1, sp + 1) if sp % u == 0]


def method_name(ulysses: int, ring: int) -> str:
    if ulysses == 1:
        return "ring-only"
    return "ulysses-only" if ring == 1 else "2D"


def _inputs(settings: Settings, sp: int, sp_rank: int, device: torch.device):
    from megatron_longvila.core.sequence_parallel.sharding import split_zigzag

    gen = torch.Generator().manual_seed(settings.seed)
    dtype = getattr(torch, settings.dtype)
    b, s, d = settings.batch, settings.seq, settings.head_dim
    full = [
        torch.randn(b, s, settings.heads, d, generator=gen),
        torch.randn(b, s, settings.kv_heads, d, generator=gen),
        torch.randn(b, s, settings.kv_heads, d, generator=gen),
        torch.randn(b, s, settings.heads, d, generator=gen),
    ]
    return [split_zigzag(t, sp, sp_rank).to(device=device, dtype=dtype) for t in full]


def _step(q, k, v, dout, settings: Settings, groups) -> None:
    from megatron_longvila.core.sequence_parallel.attention import mmsp_attention

    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out = mmsp_attention(q, k, v, causal=settings.causal, groups=groups)
    out.backward(dout)


def _peak_bytes(q, k, v, dout, settings: Settings, groups) -> int:
    from megatron_longvila.core.memory_tracking import TensorMemoryMeter

    with TensorMemoryMeter(q.device) as meter:
        _step(q, k, v, dout, settings, groups)
    return meter.peak


def measure_split(settings: Settings, ulysses: int, ring: int) -> dict[str, Any]:
    """On every rank: time, bytes and peak memory of one split; rank 0's row is the result."""
    from megatron.core import parallel_state as mcore

    from megatron_longvila.core import platform
    from megatron_longvila.core.parallel_state import MMSPTopology, initialize_mmsp
    from megatron_longvila.core.sequence_parallel import comm_stats, kernels

    groups = initialize_mmsp(MMSPTopology(ulysses=ulysses, ring=ring))
    try:
        device = platform.local_device()
        q, k, v, dout = _inputs(settings, groups.sp_size, groups.sp_rank, device)
        with comm_stats.counting() as sent, kernels.counting_flops() as flops:
            _step(q, k, v, dout, settings, groups)
        peak = torch.tensor([_peak_bytes(q, k, v, dout, settings, groups)], dtype=torch.float64)
        times = []
        for _ in range(settings.warmup + settings.repeats):
            dist.barrier()
            start = time.perf_counter()
            _step(q, k, v, dout, settings, groups)
            if device.type == "cuda":
                torch.cuda.synchronize()
            elapsed = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
            dist.all_reduce(
                elapsed, op=dist.ReduceOp.MAX
            )  # a step lasts as long as its slowest rank
            times.append(float(elapsed))
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)
        itemsize = torch.empty((), dtype=getattr(torch, settings.dtype)).element_size()
        predicted = comm_stats.mmsp_attention_bytes_per_rank(
            batch=settings.batch,
            seq_len=settings.seq,
            heads=settings.heads,
            kv_heads=settings.kv_heads,
            head_dim=settings.head_dim,
            ulysses=ulysses,
            ring=ring,
            itemsize=itemsize,
        )
        return {
            "method": method_name(ulysses, ring),
            "sp": ulysses * ring,
            "ulysses": ulysses,
            "ring": ring,
            "data_parallel": dist.get_world_size() // (ulysses * ring),
            "time_s": statistics.median(times[settings.warmup :]),
            "times_s": times[settings.warmup :],
            "bytes_per_rank": sent.bytes(),
            "bytes_by_group": sent.as_dict(),
            "predicted_bytes_per_rank": sum(sum(p.values()) for p in predicted.values()),
            "forward_flops_per_rank": flops.forward,
            "peak_bytes": int(peak),
        }
    finally:
        mcore.destroy_model_parallel()


def run_all(settings: Settings, run_on_ranks) -> list[dict[str, Any]]:
    rows = []
    for sp in settings.sp_degrees:
        for ulysses, ring in splits(sp):
            rows.append(run_on_ranks(measure_split, settings, ulysses, ring)[0])
    return rows


def markdown_table(rows: list[dict[str, Any]], settings: Settings, device: str) -> str:
    lines = [
        f"Attention fwd+bwd, b={settings.batch} s={settings.seq} heads={settings.heads} "
        f"kv_heads={settings.kv_heads} d={settings.head_dim} {settings.dtype} "
        f"causal={settings.causal}, zigzag; {device}; median of {settings.repeats} "
        f"(warm-up {settings.warmup} dropped).",
        "",
        "| sp | method | ulysses×ring | time (ms) | MB sent / rank | predicted MB | "
        "peak MB / rank |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['sp']} | {r['method']} | {r['ulysses']}×{r['ring']} | {1e3 * r['time_s']:.1f} "
            f"| {r['bytes_per_rank'] / 2**20:.2f} | {r['predicted_bytes_per_rank'] / 2**20:.2f} "
            f"| {r['peak_bytes'] / 2**20:.1f} |"
        )
    return "\n".join(lines) + "\n"


def _parse() -> tuple[Settings, int, Path]:
    defaults = Settings()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sp", type=int, nargs="+", default=list(defaults.sp_degrees))
    p.add_argument("--batch", type=int, default=defaults.batch)
    p.add_argument("--seq", type=int, default=defaults.seq)
    p.add_argument("--heads", type=int, default=defaults.heads)
    p.add_argument("--kv-heads", type=int, default=defaults.kv_heads)
    p.add_argument("--head-dim", type=int, default=defaults.head_dim)
    p.add_argument("--no-causal", action="store_true")
    p.add_argument("--dtype", default=defaults.dtype, choices=["float32", "bfloat16", "float16"])
    p.add_argument("--repeats", type=int, default=defaults.repeats)
    p.add_argument("--warmup", type=int, default=defaults.warmup)
    p.add_argument("--world", type=int, default=8, help="ranks to start without torchrun")
    p.add_argument("--out", type=Path, default=Path("runs/benchmark_sp"))
    a = p.parse_args()
    settings = Settings(
        sp_degrees=tuple(a.sp),
        batch=a.batch,
        seq=a.seq,
        heads=a.heads,
        kv_heads=a.kv_heads,
        head_dim=a.head_dim,
        causal=not a.no_causal,
        dtype=a.dtype,
        repeats=a.repeats,
        warmup=a.warmup,
    )
    return settings, a.world, a.out


def _write(rows, settings: Settings, world: int, out: Path) -> None:
    backend = "CUDA/NCCL" if torch.cuda.is_available() else "CPU/gloo"
    device = f"{world} ranks, {backend}"
    out.mkdir(parents=True, exist_ok=True)
    (out / "benchmark_sp.json").write_text(
        json.dumps({"settings": asdict(settings), "device": device, "rows": rows}, indent=2)
    )
    table = markdown_table(rows, settings, device)
    (out / "benchmark_sp.md").write_text(table)
    print(table)


def main() -> None:
    settings, world, out = _parse()
    if "WORLD_SIZE" in os.environ:  # under torchrun: this process is one rank
        from megatron_longvila.core import platform

        platform.adapt_megatron_for_cpu()
        platform.init_distributed()
        rows = run_all(settings, lambda fn, *args: [fn(*args)])
        if dist.get_rank() == 0:
            _write(rows, settings, dist.get_world_size(), out)
        dist.destroy_process_group()
        return
    from megatron_longvila.testing import RankPool

    for sp in settings.sp_degrees:
        if world % sp:
            raise SystemExit(f"--world {world} is not a multiple of sp {sp}")
    with RankPool(world) as pool:
        rows = run_all(settings, pool.run)
    _write(rows, settings, world, out)


if __name__ == "__main__":
    main()
