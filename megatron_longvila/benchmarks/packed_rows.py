"""Packed rows against unpacked rows of the same length: time and peak memory of MM-SP attention.

One row of ``seq`` tokens, either one sample (causal) or ``samples`` packed samples of uneven
lengths (segment ids; causal within each), runs forward + backward through
:func:`~megatron_longvila.core.sequence_parallel.attention.mmsp_attention` on every rank of an
sp group (zigzag shards, Ulysses × ring as :func:`~.sp_sweep.split_of` picks). Per sp degree:
the median step time of each (the slowest rank's), their ratio, the attention FLOPs actually run,
and the peak bytes allocated during one step (:class:`TensorMemoryMeter`) beside the size a
``[b, s, s]`` boolean mask of the ring block would have — the mask that packed rows used to
build, and which the rectangles never do.
"""

from __future__ import annotations

import itertools
import statistics
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from megatron_longvila.benchmarks.sp_sweep import Rows, split_of

MB = 2**20


@dataclass(frozen=True)
class Settings:
    sp_degrees: tuple[int, ...] = (1, 4)
    seq: int = 16384
    samples: int = 8
    heads: int = 4
    kv_heads: int = 2
    head_dim: int = 64
    repeats: int = 3
    seed: int = 0


def sample_lengths(seq: int, samples: int, seed: int) -> list[int]:
    """``samples`` lengths summing to ``seq``, each between half and 1.5 times the mean (so
    sample ends fall anywhere, across zigzag chunk boundaries too)."""
    gen = torch.Generator().manual_seed(seed)
    weights = 0.5 + torch.rand(samples, generator=gen, dtype=torch.float64)
    ends = (weights.cumsum(0) / weights.sum() * seq).round().long().tolist()
    return [b - a for a, b in itertools.pairwise([0, *ends])]


def _step(q, k, v, dout, segment_ids, groups) -> None:
    from megatron_longvila.core.sequence_parallel.attention import mmsp_attention

    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out = mmsp_attention(q, k, v, causal=True, segment_ids=segment_ids, groups=groups)
    out.backward(dout)


def measure(settings: Settings, ulysses: int, ring: int) -> dict[str, Any] | None:
    """On every rank: one sp degree. Ranks beyond the first sp group idle (so that sp = 1 times
    one process, not several sharing the cores); rank 0 returns the row."""
    from megatron.core import parallel_state as mcore

    from megatron_longvila.core import platform
    from megatron_longvila.core.memory_tracking import TensorMemoryMeter
    from megatron_longvila.core.parallel_state import MMSPTopology, initialize_mmsp
    from megatron_longvila.core.sequence_parallel import kernels
    from megatron_longvila.core.sequence_parallel.sharding import split_sequence

    groups = initialize_mmsp(MMSPTopology(ulysses=ulysses, ring=ring))
    try:
        sp, rank = groups.sp_size, dist.get_rank()
        active = rank < sp  # the first sp group
        device = platform.local_device()
        gen = torch.Generator().manual_seed(settings.seed)
        s, h, g, d = settings.seq, settings.heads, settings.kv_heads, settings.head_dim
        q, dout = (torch.randn(1, s, h, d, generator=gen) for _ in range(2))
        k, v = (torch.randn(1, s, g, d, generator=gen) for _ in range(2))
        lengths = sample_lengths(s, settings.samples, settings.seed)
        segments = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))[None]
        local = [split_sequence(t, sp, groups.sp_rank).to(device) for t in (q, k, v, dout)]
        kinds = {"unpacked": None, "packed": split_sequence(segments, sp, groups.sp_rank)}
        measured: dict[str, dict[str, float]] = {kind: {} for kind in kinds}
        if active:
            for kind, segment_ids in kinds.items():
                with kernels.counting_flops() as flops, TensorMemoryMeter(device) as meter:
                    _step(*local, segment_ids, groups)
                measured[kind] |= {"peak": meter.peak, "flops": flops.forward}
            times: dict[str, list[float]] = {kind: [] for kind in kinds}
            for _ in range(settings.repeats):  # alternate the two, so drifts hit both alike
                for kind, segment_ids in kinds.items():
                    if groups.sp is not None:
                        dist.barrier(group=groups.sp)
                    start = time.perf_counter()
                    _step(*local, segment_ids, groups)
                    times[kind].append(time.perf_counter() - start)
            for kind in kinds:
                measured[kind]["time"] = statistics.median(times[kind])
        # Per rank [time, peak, flops] for both kinds; rank 0 takes the slowest / largest.
        mine = torch.tensor(
            [measured[k].get(f, 0.0) for k in kinds for f in ("time", "peak", "flops")],
            dtype=torch.float64,
        )
        everyone = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
        dist.all_gather(everyone, mine)
        worst = torch.stack(everyone[:sp]).max(0).values.tolist()
        if rank != 0:
            return None
        ring_tokens = s // ring
        row: dict[str, Any] = {
            "sp": sp,
            "ulysses": ulysses,
            "ring": ring,
            "tokens_per_rank": s // sp,
            "sample_lengths": lengths,
            "mask_bytes": ring_tokens * ring_tokens,  # [1, s/R, s/R] bool per ring block
        }
        for i, kind in enumerate(kinds):
            time_s, peak, flops = worst[3 * i : 3 * i + 3]
            row |= {f"{kind}_time_s": time_s, f"{kind}_peak_bytes": int(peak)}
            row[f"{kind}_flops"] = int(flops)
        row["time_ratio"] = row["packed_time_s"] / row["unpacked_time_s"]
        return row
    finally:
        mcore.destroy_model_parallel()


def run_all(settings: Settings, run_on_ranks) -> Rows:
    rows = []
    for sp in settings.sp_degrees:
        results = run_on_ranks(measure, settings, *split_of(sp))
        rows.append(next(r for r in results if r is not None))
    return rows


def markdown_table(rows: Rows, settings: Settings, device: str) -> str:
    lengths = rows[0]["sample_lengths"] if rows else []
    lines = [
        f"MM-SP attention, forward + backward, one row of {settings.seq} tokens: unpacked "
        f"(one causal sample) vs packed ({settings.samples} samples of {lengths} tokens, causal "
        f"within each); {settings.heads}:{settings.kv_heads} heads, d = {settings.head_dim}, "
        f"fp32; median of {settings.repeats}, slowest rank; {device} (ranks beyond the first sp "
        "group idle). Peak = bytes allocated "
        "during one step (largest rank); mask = the [s/R, s/R] bool mask of one ring block that "
        "the masked path built.",
        "",
        "| sp | ulysses×ring | tokens / rank | unpacked ms | packed ms | packed / unpacked "
        "| attention GFLOP packed / unpacked | peak MB unpacked | peak MB packed "
        "| packed − unpacked MB | mask MB |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['sp']} | {r['ulysses']}×{r['ring']} | {r['tokens_per_rank']} "
            f"| {1e3 * r['unpacked_time_s']:.0f} | {1e3 * r['packed_time_s']:.0f} "
            f"| {r['time_ratio']:.2f} "
            f"| {r['packed_flops'] / 1e9:.1f} / {r['unpacked_flops'] / 1e9:.1f} "
            f"| {r['unpacked_peak_bytes'] / MB:.1f} | {r['packed_peak_bytes'] / MB:.1f} "
            f"| {(r['packed_peak_bytes'] - r['unpacked_peak_bytes']) / MB:.1f} "
            f"| {r['mask_bytes'] / MB:.1f} |"
        )
    return "\n".join(lines) + "\n"
