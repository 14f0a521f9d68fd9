"""Activation memory per rank of the LongVILA model under MM-SP, for several sp degrees.

One micro-batch of a fixed global length (one row of exactly ``--seq`` tokens after expansion: a
sample with a long video and an image, or with ``--packed`` a video sample packed with an image
sample) runs forward + backward through
:class:`LongVILAModel` (tiny preset unless ``--preset``) at each sp degree; every rank measures
the bytes of tensors allocated during its step beyond the model and its inputs
(:class:`TensorMemoryMeter`: CUDA's allocator statistics on GPUs, a dispatch-level tracker of
tensor storages on CPU):

* ``saved``: bytes still held when the forward pass ends (activations kept for backward);
* ``peak``: the most bytes held at once during forward + backward (gradients of the parameters
  included, a small part for the tiny model).

With the sequence split over ``sp`` ranks (frames by stage 1, tokens by stage 2), both should
fall close to ``1/sp``, packed rows (``--packed``; attention over the rectangles where a segment
meets itself, no mask) included. Writes ``measure_memory.json`` and ``measure_memory.md``::

    python tools/measure_memory.py --world 4 --sp 1 2 4 --seq 8192 --out runs/measure_memory
    torchrun --nproc-per-node 4 tools/measure_memory.py --sp 1 2 4

``--options`` measures instead what each memory option of the model saves (one rank; see
:mod:`megatron_longvila.benchmarks.memory_options`) and writes ``memory_options.{json,md}``::

    python tools/measure_memory.py --options --out docs/benchmarks

``--tp-regions`` measures Megatron's TP sequence parallelism instead (``measure_memory_tp.*``):
at sp = 1 and each ``--tp`` degree, the bytes autograd saves in the forward pass per rank, by
region — the norms (whose inputs are the residual stream), the tensor-parallel attention/MLP,
the rest. With it on, the norm region's bytes fall to ``1/tp``; the largest tp runs once more
without it for comparison::

    python tools/measure_memory.py --tp-regions --world 2 --tp 1 2 --seq 4096
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from megatron_longvila.benchmarks.sp_sweep import ratio_text, run_sweep, split_of, with_ratios


@dataclass(frozen=True)
class Settings:
    sp_degrees: tuple[int, ...] = (1, 2, 4)
    seq: int = 8192
    video_frames: int = 1024
    preset: str = "tiny"
    packed: bool = False
    seed: int = 0


def fixed_length_batch(settings: Settings, cfg):
    """One row of exactly ``settings.seq`` expanded tokens holding a ``video_frames``-frame video
    and an image, in one sample (or two packed samples with ``settings.packed``); text fills the
    rest, the second half of each sample answered."""
    from megatron_longvila.data.batch import IGNORE_INDEX, MultimodalSample
    from megatron_longvila.data.packing import collate_rows

    gen = torch.Generator().manual_seed(settings.seed)
    visual = (settings.video_frames + 1) * cfg.tokens_per_frame
    text = settings.seq - visual + 2  # the two placeholders become visual tokens
    if text < 8:
        raise SystemExit(
            f"--seq {settings.seq} leaves no room for text beside {settings.video_frames} + 1 "
            f"frames × {cfg.tokens_per_frame} tokens"
        )
    size, channels = cfg.vision.image_size, cfg.vision.num_channels
    media = [
        torch.randn(settings.video_frames, channels, size, size, generator=gen),
        torch.randn(1, channels, size, size, generator=gen),
    ]
    placeholders = [cfg.video_token_id, cfg.image_token_id]
    groups = [[0], [1]] if settings.packed else [[0, 1]]
    lengths = [text // len(groups)] * len(groups)
    lengths[-1] += text % len(groups)
    samples = []
    for number, (items, length) in enumerate(zip(groups, lengths)):
        ids = torch.randint(0, min(placeholders), (length,), generator=gen)
        for k, item in enumerate(items):
            ids[1 + k] = placeholders[item]
        labels = torch.full((length,), IGNORE_INDEX)
        labels[length // 2 :] = ids[length // 2 :]
        kinds = ["video" if item == 0 else "image" for item in items]
        samples.append(
            MultimodalSample(f"s{number}", ids, labels, [media[i] for i in items], kinds)
        )
    return collate_rows([samples], pad_id=0)


def measure(settings: Settings, ulysses: int, ring: int) -> dict[str, Any]:
    """On every rank: saved and peak bytes of one forward + backward; rank 0 returns the row."""
    from megatron.core import parallel_state as mcore

    from megatron_longvila.core import platform
    from megatron_longvila.core.memory_tracking import TensorMemoryMeter
    from megatron_longvila.core.parallel_state import MMSPTopology, initialize_mmsp
    from megatron_longvila.models.config import LongVILAConfig
    from megatron_longvila.models.longvila_step import build_longvila_model

    groups = initialize_mmsp(MMSPTopology(ulysses=ulysses, ring=ring))
    try:
        cfg = LongVILAConfig.preset(settings.preset, max_seq_length=settings.seq)
        (model,) = build_longvila_model(cfg, seed=settings.seed)
        batch = fixed_length_batch(settings, cfg)
        inputs = model.prepare_inputs(batch).to(platform.local_device())
        valid = torch.tensor([float((inputs.labels >= 0).sum())])
        if groups.sp_size > 1:
            dist.all_reduce(valid, group=groups.sp)
        with TensorMemoryMeter(platform.local_device()) as meter:
            losses = model(inputs)
            saved = meter.current
            (losses.sum() / valid).backward()
        frames = inputs.frames
        frame_bytes = 0 if frames is None else frames.numel() * frames.element_size()
        row = torch.tensor([saved, meter.peak, frame_bytes], dtype=torch.float64)
        rows = [torch.zeros_like(row) for _ in range(dist.get_world_size())]
        dist.all_gather(rows, row)
        per_rank = torch.stack(rows)
        return {
            "sp": ulysses * ring,
            "ulysses": ulysses,
            "ring": ring,
            "seq": inputs.seq_length,
            "tokens_per_rank": inputs.input_ids.numel(),
            "saved_bytes_max": int(per_rank[:, 0].max()),
            "saved_bytes_min": int(per_rank[:, 0].min()),
            "peak_bytes_max": int(per_rank[:, 1].max()),
            "peak_bytes_min": int(per_rank[:, 1].min()),
            "frame_bytes_max": int(per_rank[:, 2].max()),
        }
    finally:
        mcore.destroy_model_parallel()


def markdown_table(rows: list[dict[str, Any]], settings: Settings, device: str) -> str:
    lines = [
        f"LongVILA `{settings.preset}`, one row of {settings.seq} tokens ({settings.video_frames}"
        f"-frame video + image + text, {'two packed samples' if settings.packed else 'one sample'}"
        f"), forward + backward; {device}. Bytes per rank (largest rank); ratio = vs sp = 1.",
        "",
        "| sp | ulysses×ring | tokens / rank | saved MB | saved ratio | peak MB | peak ratio | "
        "1/sp |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['sp']} | {r['ulysses']}×{r['ring']} | {r['tokens_per_rank']} "
            f"| {r['saved_bytes_max'] / 2**20:.2f} | {ratio_text(r['saved_ratio'])} "
            f"| {r['peak_bytes_max'] / 2**20:.2f} | {ratio_text(r['peak_ratio'])} "
            f"| {1 / r['sp']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def run_all(settings: Settings, run_on_ranks) -> list[dict[str, Any]]:
    return with_ratios(
        [run_on_ranks(measure, settings, *split_of(sp))[0] for sp in settings.sp_degrees],
        ("saved", "peak"),
    )


# ---- TP sequence parallelism: activations saved per region -------------------------------------


@dataclass(frozen=True)
class TPSettings:
    """The ``--tp-regions`` sweep: sp = 1, each tp degree with Megatron's TP sequence
    parallelism, and the largest also without it (what each rank held before)."""

    tp_degrees: tuple[int, ...] = (1, 2)
    seq: int = 4096
    video_frames: int = 64
    preset: str = "tiny"
    packed: bool = False
    seed: int = 0
    sp_degrees: tuple[int, ...] = (1,)  # read by run_sweep


#: Regions by the innermost running module's name: norms (and the residual stream around them),
#: the tensor-parallel attention/MLP, and the rest (embeddings, vision stem, projector, loss).
_REGIONS = ("norm", "attention_mlp", "other")


def _region(module_name: str) -> str:
    leaf = module_name.rsplit(".", 1)[-1]
    if (leaf.endswith("layernorm") and ".layers." in module_name) or leaf == "final_layernorm":
        return "norm"
    if ".self_attention" in module_name or ".mlp" in module_name:
        return "attention_mlp"
    return "other"


def measure_tp_regions(settings: TPSettings, tp: int, sequence_parallel: bool) -> dict[str, Any]:
    """On every rank: bytes of the tensors autograd saves in one forward pass, by region
    (``torch.autograd.graph.saved_tensors_hooks``; parameters left out, each storage once);
    rank 0 returns the row with each region's largest rank."""
    from megatron.core import parallel_state as mcore

    from megatron_longvila.core import platform
    from megatron_longvila.core.parallel_state import MMSPTopology, initialize_mmsp
    from megatron_longvila.models.config import LongVILAConfig
    from megatron_longvila.models.longvila_step import build_longvila_model

    initialize_mmsp(MMSPTopology(tp=tp))
    try:
        cfg = LongVILAConfig.preset(settings.preset, max_seq_length=settings.seq)
        overrides = {"sequence_parallel": sequence_parallel}
        (model,) = build_longvila_model(cfg, seed=settings.seed, transformer_overrides=overrides)
        inputs = model.prepare_inputs(fixed_length_batch(settings, cfg))
        inputs = inputs.to(platform.local_device())
        stack: list[str] = []  # names of the modules running now, innermost last

        def leave(*_: Any) -> None:
            stack.pop()

        for name, module in model.named_modules():
            module.register_forward_pre_hook(lambda _m, _a, name=name: stack.append(name))
            module.register_forward_hook(leave)
        params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        seen: set[int] = set()
        saved = dict.fromkeys(_REGIONS, 0)

        def pack(tensor: torch.Tensor) -> torch.Tensor:
            storage = tensor.untyped_storage()
            key = storage.data_ptr()
            if key not in params and key not in seen:
                seen.add(key)
                saved[_region(stack[-1] if stack else "")] += storage.nbytes()
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            model(inputs).sum().backward()
        row = torch.tensor([saved[r] for r in _REGIONS], dtype=torch.float64)
        rows = [torch.zeros_like(row) for _ in range(dist.get_world_size())]
        dist.all_gather(rows, row)
        largest = torch.stack(rows).max(dim=0).values
        return {
            "tp": tp,
            "sequence_parallel": model.config.sequence_parallel,
            "seq": inputs.seq_length,
            **{f"{r}_bytes_max": int(b) for r, b in zip(_REGIONS, largest)},
        }
    finally:
        mcore.destroy_model_parallel()


def run_tp_regions(settings: TPSettings, run_on_ranks) -> list[dict[str, Any]]:
    largest = max(settings.tp_degrees)
    layouts = [(tp, tp > 1) for tp in settings.tp_degrees]
    if largest > 1:
        layouts.append((largest, False))
    rows = [run_on_ranks(measure_tp_regions, settings, tp, sp)[0] for tp, sp in layouts]
    base = next((r for r in rows if r["tp"] == 1), None)
    for r in rows:
        for region in _REGIONS:
            key = f"{region}_bytes_max"
            r[f"{region}_ratio"] = r[key] / base[key] if base and base[key] else None
    return rows


def tp_regions_table(rows: list[dict[str, Any]], settings: TPSettings, device: str) -> str:
    lines = [
        f"LongVILA `{settings.preset}`, one row of {settings.seq} tokens ({settings.video_frames}"
        f"-frame video + image + text), sp = 1; {device}. Bytes autograd saves in the forward "
        "pass per rank (largest rank), by region; ratio = vs tp = 1.",
        "",
        "| tp | TP sequence parallel | norm MB | norm ratio | attention+MLP MB | "
        "attention+MLP ratio | other MB |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['tp']} | {'on' if r['sequence_parallel'] else 'off'} "
            f"| {r['norm_bytes_max'] / 2**20:.2f} | {ratio_text(r['norm_ratio'])} "
            f"| {r['attention_mlp_bytes_max'] / 2**20:.2f} "
            f"| {ratio_text(r['attention_mlp_ratio'])} | {r['other_bytes_max'] / 2**20:.2f} |"
        )
    return "\n".join(lines) + "\n"


def _parse() -> tuple[Settings, int, Path]:
    defaults = Settings()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sp", type=int, nargs="+", default=list(defaults.sp_degrees))
    p.add_argument("--seq", type=int, default=defaults.seq)
    p.add_argument("--video-frames", type=int, default=defaults.video_frames)
    p.add_argument("--preset", default=defaults.preset)
    p.add_argument("--packed", action="store_true", help="two packed samples in the row")
    p.add_argument("--world", type=int, default=4, help="ranks to start without torchrun")
    p.add_argument("--out", type=Path, default=Path("runs/measure_memory"))
    p.add_argument(
        "--options", action="store_true", help="what each memory option saves, per layer and loss"
    )
    a = p.parse_args()
    if a.options:
        from megatron_longvila.benchmarks.memory_options import run

        print(run(a.out))
        raise SystemExit(0)
    settings = Settings(
        sp_degrees=tuple(a.sp),
        seq=a.seq,
        video_frames=a.video_frames,
        preset=a.preset,
        packed=a.packed,
    )
    return settings, a.world, a.out


def _parse_tp_regions(argv: list[str]) -> tuple[TPSettings, int, Path]:
    defaults = TPSettings()
    p = argparse.ArgumentParser(description="activations saved per region at each tp degree")
    p.add_argument("--tp-regions", action="store_true", required=True)
    p.add_argument("--tp", type=int, nargs="+", default=list(defaults.tp_degrees))
    p.add_argument("--seq", type=int, default=defaults.seq)
    p.add_argument("--video-frames", type=int, default=defaults.video_frames)
    p.add_argument("--preset", default=defaults.preset)
    p.add_argument("--world", type=int, default=2, help="ranks to start without torchrun")
    p.add_argument("--out", type=Path, default=Path("runs/measure_memory"))
    a = p.parse_args(argv)
    settings = TPSettings(
        tp_degrees=tuple(a.tp), seq=a.seq, video_frames=a.video_frames, preset=a.preset
    )
    return settings, a.world, a.out


def main() -> None:
    if "--tp-regions" in sys.argv[1:]:
        tp_settings, world, out = _parse_tp_regions(sys.argv[1:])
        run_sweep("measure_memory_tp", tp_settings, world, out, run_tp_regions, tp_regions_table)
        return
    settings, world, out = _parse()
    run_sweep("measure_memory", settings, world, out, run_all, markdown_table)


if __name__ == "__main__":
    main()
