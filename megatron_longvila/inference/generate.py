"""longvila-generate: answer a question about a long video with MM-SP inference.

    torchrun --nproc-per-node 4 -m megatron_longvila.inference.generate \\
        --checkpoint runs/stage5/checkpoints --video clip.mp4 --prompt "What happens?" \\
        --num-frames 256 --sp 4 --ulysses 2 --ring 2

Every process is one rank; ``world = tp × sp`` (pipeline size 1, no data parallelism). Without
``--sp`` all ranks left after ``--tp`` form the sp group; without ``--ulysses/--ring`` Ulysses
takes the largest split that stays inside a node and divides the heads, ring the rest. Run
without torchrun it is one process (sp = 1). Rank 0 prints the answer, then the prompt length,
prefill time, decode speed, and each rank's peak memory and KV-cache size; ``--output-json``
writes the same as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from megatron_longvila.checkpoint.layout import CheckpointError
from megatron_longvila.core import cpu_adaptations, platform
from megatron_longvila.core.parallel_state import MMSPTopology, initialize_mmsp
from megatron_longvila.data.chat_template import TEMPLATES, all_template_markers
from megatron_longvila.data.tokenizer import load_tokenizer
from megatron_longvila.data.video import VideoDecodeError
from megatron_longvila.inference.generator import FrameSettings, Generator
from megatron_longvila.inference.loading import load_model_for_inference, resolve_checkpoint
from megatron_longvila.models.config import TOKEN_ORDERS, ConfigError, LongVILAConfig

MIB = 1 << 20
TOKEN_ORDER_HELP = "order of the merged visual tokens, for a Hugging Face folder that cannot tell"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="longvila-generate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="checkpoint root, iter_* or HF folder")
    parser.add_argument("--video", help="video file (omit for a text-only prompt)")
    parser.add_argument("--prompt", required=True, help="the question")
    parser.add_argument("--num-frames", type=int, default=8, help="frames sampled uniformly")
    parser.add_argument("--fps", type=float, help="sample at this rate instead (≤ --max-frames)")
    parser.add_argument("--max-frames", type=int, default=1024)
    parser.add_argument("--resize-mode", choices=("pad", "crop"), default="pad")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel size")
    parser.add_argument("--sp", type=int, help="MM-SP degree (default: world size / tp)")
    parser.add_argument("--ulysses", type=int, help="Ulysses part of sp (inside a node)")
    parser.add_argument("--ring", type=int, help="ring part of sp (across nodes)")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--stop", action="append", default=[], help="stop token (repeatable; default: end of turn)"
    )
    parser.add_argument("--tokenizer", help="tokenizer (default: recorded in the checkpoint)")
    parser.add_argument("--chat-template", choices=sorted(TEMPLATES))
    parser.add_argument("--system-prompt")
    parser.add_argument("--model-preset", help="architecture, if the checkpoint records none")
    parser.add_argument("--token-order", choices=TOKEN_ORDERS, help=TOKEN_ORDER_HELP)
    parser.add_argument("--dtype", choices=("auto", "fp32", "bf16"), default="auto")
    parser.add_argument("--output-json", type=Path, help="also write the result here (rank 0)")
    return parser.parse_args(argv)


def choose_topology(
    args: argparse.Namespace, world: int, local_world: int, cfg: LongVILAConfig
) -> MMSPTopology:
    """tp × ulysses × ring for ``world`` ranks (see the module docstring); refuses sizes that do
    not fit, naming them."""
    if world % args.tp:
        raise ValueError(f"world size {world} is not divisible by --tp {args.tp}")
    sp = args.sp or world // args.tp
    if args.ulysses or args.ring:
        ulysses = args.ulysses or sp // args.ring
        ring = args.ring or sp // ulysses
        if ulysses * ring != sp:
            raise ValueError(f"--ulysses {ulysses} × --ring {ring} is not --sp {sp}")
        candidates = [(ulysses, ring)]
    else:
        per_node = max(1, local_world // args.tp)
        candidates = [(u, sp // u) for u in range(min(sp, per_node), 0, -1) if sp % u == 0]
    if args.tp * sp != world:
        raise ValueError(
            f"inference uses every rank for one prompt: tp × sp = {args.tp} × {sp} must equal the "
            f"world size {world}"
        )
    problems = []
    for ulysses, ring in candidates:
        topology = MMSPTopology(tp=args.tp, ulysses=ulysses, ring=ring)
        try:
            topology.validate(world, cfg.llm.num_heads, cfg.llm.num_kv_heads)
            return topology
        except ValueError as exc:
            problems.append(str(exc))
    raise ValueError("; ".join(problems))


def peak_memory() -> tuple[int, str]:
    """(bytes, what was measured): the allocator's peak on a GPU, the peak RSS on the CPU."""
    if platform.cuda_available():
        return torch.cuda.max_memory_allocated(), "GPU allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "RSS"


def _stop_ids(names: list[str], generator: Generator) -> tuple[int, ...] | None:
    if not names:
        return None
    ids = []
    for name in names:
        try:
            ids.append(generator.tokenizer.special_id(name))
        except KeyError:
            encoded = generator.tokenizer.encode(name)
            if len(encoded) != 1:
                raise ValueError(f"--stop {name!r} is {len(encoded)} tokens, not one") from None
            ids.append(encoded[0])
    return tuple(ids)


def load_generator(
    args: argparse.Namespace, params_dtype: torch.dtype
) -> tuple[Generator, MMSPTopology, str]:
    """(generator, layout, tokenizer path) from the command line's model options (checkpoint,
    model preset, tokenizer, chat template, system prompt, frame sampling, tp / sp / ulysses /
    ring): the layout is chosen and initialized, then the checkpoint loaded into it."""
    source = resolve_checkpoint(args.checkpoint, args.token_order)
    model_config = LongVILAConfig.preset(args.model_preset) if args.model_preset else None
    cfg = model_config or source.config
    if cfg is None:
        raise CheckpointError(
            f"{source.directory} does not record the model architecture; pass --model-preset"
        )
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", dist.get_world_size()))
    topology = choose_topology(args, dist.get_world_size(), local_world, cfg)
    initialize_mmsp(topology)
    model, source = load_model_for_inference(
        args.checkpoint,
        model_config=model_config,
        token_order=args.token_order,
        params_dtype=params_dtype,
    )
    tokenizer_path = args.tokenizer or source.tokenizer_path
    if tokenizer_path is None:
        raise CheckpointError(f"{source.directory} records no tokenizer; pass --tokenizer")
    tokenizer = load_tokenizer(tokenizer_path, all_template_markers())
    generator = Generator(
        model,
        tokenizer,
        chat_template=args.chat_template or source.chat_template or "qwen2",
        system_prompt=args.system_prompt,
        frames=FrameSettings(args.num_frames, args.fps, args.max_frames, args.resize_mode),
    )
    return generator, topology, tokenizer_path


def run(args: argparse.Namespace) -> dict[str, Any] | None:
    """Load, generate, and return the report on rank 0 (None elsewhere)."""
    generator, topology, _ = load_generator(args, platform.dtype_from_name(args.dtype))
    answer = generator.generate(
        args.prompt,
        args.video,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
        stop_token_ids=_stop_ids(args.stop, generator),
    )
    memory, measured = peak_memory()
    g = answer.generation
    mine = {"peak_memory_bytes": memory, "kv_cache_bytes": g.kv_cache_bytes}
    ranks = [None] * dist.get_world_size()
    dist.all_gather_object(ranks, mine)
    if dist.get_rank() != 0:
        return None
    return {
        "answer": answer.text,
        "token_ids": answer.token_ids,
        "finish_reason": g.finish_reason,
        "prompt_tokens": g.prompt_length,
        "frames": answer.num_frames,
        "topology": {"tp": topology.tp, "ulysses": topology.ulysses, "ring": topology.ring},
        "prefill_seconds": g.prefill_seconds,
        "decode_seconds": g.decode_seconds,
        "decode_tokens_per_second": g.decode_tokens_per_second,
        "peak_memory_measured": measured,
        "ranks": ranks,
    }


def format_report(report: dict[str, Any]) -> str:
    t = report["topology"]
    lines = [
        report["answer"],
        "",
        f"prompt: {report['prompt_tokens']} tokens ({report['frames']} frames); generated "
        f"{len(report['token_ids'])} tokens "
        f"(finish: {report['finish_reason']}); tp={t['tp']} sp={t['ulysses'] * t['ring']} "
        f"(ulysses {t['ulysses']} × ring {t['ring']})",
        f"prefill: {report['prefill_seconds']:.3f} s; decode: "
        f"{report['decode_tokens_per_second']:.2f} tokens/s "
        f"({len(report['token_ids']) - 1} tokens in {report['decode_seconds']:.3f} s)",
        f"{'rank':>4}  {'peak memory (' + report['peak_memory_measured'] + ')':>24}  "
        f"{'KV cache':>12}",
    ]
    for rank, stats in enumerate(report["ranks"]):
        lines.append(
            f"{rank:>4}  {stats['peak_memory_bytes'] / MIB:>20.1f} MiB  "
            f"{stats['kv_cache_bytes'] / MIB:>8.3f} MiB"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cpu_adaptations.adapt_megatron_for_cpu()
    platform.init_distributed()
    try:
        report = run(args)
    except (CheckpointError, ConfigError, ValueError, VideoDecodeError, FileNotFoundError) as exc:
        if dist.get_rank() == 0:
            print(f"error: {exc}", file=sys.stderr)
        dist.destroy_process_group()
        return 2
    if report is not None:
        print(format_report(report), flush=True)
        if args.output_json:
            args.output_json.write_text(json.dumps(report, indent=2), encoding="utf-8")
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
