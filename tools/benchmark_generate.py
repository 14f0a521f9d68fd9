"""MM-SP long-video generation per sp degree: prefill time, decode speed, KV cache and memory.

One prompt — a ``--frames``-frame video (random pixels) and a short question — is answered with
``--new-tokens`` greedy tokens by :func:`~megatron_longvila.inference.decoding.generate_tokens`
on a randomly initialised LongVILA model (``--preset``, tiny by default) at each sp degree
(Ulysses up to 2, ring for the rest). Data-parallel replicas beyond the first stay idle, so the
ranks that work have the machine's cores to themselves. Per rank:

* ``prefill s`` and ``decode tok/s`` of a timed pass;
* ``KV cache``: bytes of keys and values the rank holds (all layers, reserved for the whole
  answer) — ``1/sp`` of the single-process cache within one token per layer;
* ``prefill peak`` and ``kept after prefill``: bytes of tensors allocated during the prefill of
  a second pass, at the peak and still held when it ends (the cache and the first logits), by
  :class:`~megatron_longvila.core.memory_tracking.TensorMemoryMeter`.

Writes ``benchmark_generate.json`` and ``benchmark_generate.md``::

    python tools/benchmark_generate.py --world 4 --sp 1 2 4 --frames 512 --out runs/generate
    torchrun --nproc-per-node 4 tools/benchmark_generate.py --sp 1 2 4
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from megatron_longvila.benchmarks.sp_sweep import ratio_text, run_sweep, split_of, with_ratios


@dataclass(frozen=True)
class Settings:
    sp_degrees: tuple[int, ...] = (1, 2, 4)
    frames: int = 512
    text_tokens: int = 32
    new_tokens: int = 32
    preset: str = "tiny"
    seed: int = 0


def measure(settings: Settings, ulysses: int, ring: int) -> dict[str, Any] | None:
    """On the ranks of the first replica: one timed generation and one measured prefill."""
    from megatron.core import parallel_state as mcore

    from megatron_longvila.core import platform
    from megatron_longvila.core.memory_tracking import TensorMemoryMeter
    from megatron_longvila.core.parallel_state import MMSPTopology, initialize_mmsp
    from megatron_longvila.inference.decoding import MultimodalPrompt, generate_tokens, prefill
    from megatron_longvila.inference.sampling import SamplingParams
    from megatron_longvila.models.config import LongVILAConfig
    from megatron_longvila.models.longvila_step import build_longvila_model

    groups = initialize_mmsp(MMSPTopology(ulysses=ulysses, ring=ring))
    try:
        if mcore.get_data_parallel_rank() != 0:
            return None  # no collective crosses replicas: the others idle
        cfg = LongVILAConfig.preset(settings.preset)
        (model,) = build_longvila_model(cfg, seed=settings.seed)
        model.eval()
        gen = torch.Generator().manual_seed(settings.seed)
        text_vocab = min(cfg.image_token_id, cfg.video_token_id)
        ids = torch.randint(0, text_vocab, (settings.text_tokens,), generator=gen)
        ids[1] = cfg.video_token_id
        size = cfg.vision.image_size
        video = torch.randn(settings.frames, cfg.vision.num_channels, size, size, generator=gen)
        prompt = MultimodalPrompt.from_media(ids, [video], groups.sp_size, groups.sp_rank)
        params = SamplingParams(max_new_tokens=settings.new_tokens)
        generation = generate_tokens(model, prompt, params)
        with TensorMemoryMeter(platform.local_device()) as meter:
            _, state = prefill(model, prompt, settings.new_tokens)
            kept = meter.current
        mine = torch.tensor(
            [
                generation.prefill_seconds,
                generation.decode_tokens_per_second,
                generation.kv_cache_bytes,
                meter.peak,
                kept,
                state.kv.memory_bytes(),
            ],
            dtype=torch.float64,
        )
        ranks = [torch.zeros_like(mine) for _ in range(groups.sp_size)]
        if groups.sp_size > 1:
            dist.all_gather(ranks, mine, group=groups.sp)
        else:
            ranks = [mine]
        per_rank = torch.stack(ranks)
        if groups.sp_rank != 0:
            return None
        return {
            "sp": groups.sp_size,
            "ulysses": ulysses,
            "ring": ring,
            "prompt_tokens": generation.prompt_length,
            "new_tokens": len(generation.token_ids),
            "prefill_seconds_max": float(per_rank[:, 0].max()),
            "decode_tokens_per_second": float(per_rank[:, 1].min()),
            "kv_cache_bytes_max": int(per_rank[:, 2].max()),
            "kv_cache_bytes_min": int(per_rank[:, 2].min()),
            "prefill_peak_bytes_max": int(per_rank[:, 3].max()),
            "kept_after_prefill_bytes_max": int(per_rank[:, 4].max()),
        }
    finally:
        mcore.destroy_model_parallel()


def markdown_table(rows: list[dict[str, Any]], settings: Settings, device: str) -> str:
    mib = 2**20
    lines = [
        f"LongVILA `{settings.preset}` (random weights), {rows[0]['prompt_tokens']}-token prompt "
        f"({settings.frames} frames), {settings.new_tokens} greedy tokens; {device}. Bytes per "
        "rank (largest rank); ratio = vs sp = 1.",
        "",
        "| sp | ulysses×ring | prefill s | decode tok/s | KV cache MiB | ratio | prefill peak "
        "MiB | ratio | kept after prefill MiB | 1/sp |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['sp']} | {r['ulysses']}×{r['ring']} | {r['prefill_seconds_max']:.3f} "
            f"| {r['decode_tokens_per_second']:.1f} | {r['kv_cache_bytes_max'] / mib:.3f} "
            f"| {ratio_text(r['kv_cache_ratio'])} | {r['prefill_peak_bytes_max'] / mib:.2f} "
            f"| {ratio_text(r['prefill_peak_ratio'])} "
            f"| {r['kept_after_prefill_bytes_max'] / mib:.3f} "
            f"| {1 / r['sp']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def run_all(settings: Settings, run_on_ranks) -> list[dict[str, Any]]:
    rows = []
    for sp in settings.sp_degrees:
        rows += [row for row in run_on_ranks(measure, settings, *split_of(sp)) if row]
    return with_ratios(rows, ("kv_cache", "prefill_peak"))


def _parse() -> tuple[Settings, int, Path]:
    defaults = Settings()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sp", type=int, nargs="+", default=list(defaults.sp_degrees))
    p.add_argument("--frames", type=int, default=defaults.frames)
    p.add_argument("--text-tokens", type=int, default=defaults.text_tokens)
    p.add_argument("--new-tokens", type=int, default=defaults.new_tokens)
    p.add_argument("--preset", default=defaults.preset)
    p.add_argument("--world", type=int, default=4, help="ranks to start without torchrun")
    p.add_argument("--out", type=Path, default=Path("runs/benchmark_generate"))
    a = p.parse_args()
    settings = Settings(
        sp_degrees=tuple(a.sp),
        frames=a.frames,
        text_tokens=a.text_tokens,
        new_tokens=a.new_tokens,
        preset=a.preset,
    )
    return settings, a.world, a.out


def main() -> None:
    settings, world, out = _parse()
    run_sweep("benchmark_generate", settings, world, out, run_all, markdown_table)


if __name__ == "__main__":
    main()
