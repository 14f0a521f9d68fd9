"""longvila-eval: needle-in-a-haystack, VideoMME-format multiple choice and captioning scores.

    torchrun --nproc-per-node 4 -m megatron_longvila.eval needle \\
        --checkpoint runs/stage5/checkpoints --frame-counts 32,64,128 --depths 0,25,50,75,100 \\
        --output results/needle.json
    torchrun --nproc-per-node 4 -m megatron_longvila.eval videomme --checkpoint ... \\
        --questions videomme.json --videos videos/ --subtitles subtitles/ --output vmme.json
    torchrun --nproc-per-node 4 -m megatron_longvila.eval caption --checkpoint ... \\
        --items captions.jsonl --judge /models/judge-llm --output captions.json

All ranks serve one prompt at a time with MM-SP (``world = tp × ulysses × ring``, chosen as
``longvila-generate`` does: Ulysses inside a node as far as the heads allow, ring across). Rank 0
shows progress and writes the JSON; a run started again with the same output resumes where it
stopped (``--restart`` starts over). Without torchrun it runs as one process.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch.distributed as dist

from megatron_longvila.checkpoint.layout import CheckpointError
from megatron_longvila.core import cpu_adaptations, platform
from megatron_longvila.data.chat_template import TEMPLATES
from megatron_longvila.data.video import VideoDecodeError
from megatron_longvila.eval.captioning import CaptionSettings, load_caption_items, run_captioning
from megatron_longvila.eval.generator_predictor import GeneratorPredictor
from megatron_longvila.eval.heatmap import plot_needle_heatmap
from megatron_longvila.eval.judge import HFCausalLMJudge
from megatron_longvila.eval.needle import (
    SCORINGS,
    Haystack,
    NeedleSettings,
    run_needle_eval,
    write_synthetic_haystack,
)
from megatron_longvila.eval.results_file import is_rank0
from megatron_longvila.eval.videomme import (
    MODES,
    VARIANTS,
    VideoMMEQuestion,
    VideoMMESettings,
    load_questions,
    run_videomme,
)
from megatron_longvila.inference.generate import TOKEN_ORDER_HELP, load_generator
from megatron_longvila.models.config import TOKEN_ORDERS, ConfigError


def _int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _percent_list(text: str) -> list[float]:
    return [float(x) / 100 for x in text.split(",") if x.strip()]


def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
    model = parser.add_argument_group("model")
    model.add_argument("--checkpoint", required=True, help="checkpoint root, iter_* or HF folder")
    model.add_argument("--tokenizer", help="tokenizer (default: recorded in the checkpoint)")
    model.add_argument("--chat-template", choices=sorted(TEMPLATES))
    model.add_argument("--system-prompt")
    model.add_argument("--model-preset", help="architecture, if the checkpoint records none")
    model.add_argument("--token-order", choices=TOKEN_ORDERS, help=TOKEN_ORDER_HELP)
    model.add_argument("--dtype", choices=("auto", "fp32", "bf16"), default="fp32")
    model.add_argument("--tp", type=int, default=1, help="tensor-parallel size")
    model.add_argument("--sp", type=int, help="MM-SP degree (default: world size / tp)")
    model.add_argument("--ulysses", type=int, help="Ulysses part of sp (inside a node)")
    model.add_argument("--ring", type=int, help="ring part of sp (across nodes)")
    model.add_argument("--num-frames", type=int, default=8, help="frames sampled from a file")
    model.add_argument("--fps", type=float, help="sample at this rate instead (≤ --max-frames)")
    model.add_argument("--max-frames", type=int, default=1024)
    model.add_argument("--resize-mode", choices=("pad", "crop"), default="pad")
    run = parser.add_argument_group("run")
    run.add_argument("--output", type=Path, required=True, help="results JSON (rank 0)")
    run.add_argument("--restart", action="store_true", help="start over instead of resuming")


def _needle_parser(sub) -> None:
    p = sub.add_parser("needle", help="needle in a haystack: frames × depth heatmap")
    _add_model_arguments(p)
    p.add_argument("--haystack", type=Path, help="haystack video (default: a synthetic one)")
    p.add_argument("--haystack-frames", type=int, default=0, help="frames of a synthetic one")
    p.add_argument("--haystack-size", type=int, default=64, help="side of a synthetic one")
    p.add_argument("--frame-counts", type=_int_list, default=[8, 16, 32])
    p.add_argument("--depths", type=_percent_list, default=[0.0, 0.25, 0.5, 0.75, 1.0])
    p.add_argument("--trials", type=int, default=2, help="needles per cell")
    p.add_argument("--needle-frames", type=int, default=1)
    p.add_argument("--needle-range", type=int, default=100, help="needles are 0..range-1")
    p.add_argument("--scoring", choices=SCORINGS, default="options")
    p.add_argument("--num-options", type=int, default=4)
    p.add_argument("--question", default=NeedleSettings.question)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--heatmap", type=Path, help="PNG (default: the output with .png)")


def _videomme_parser(sub) -> None:
    p = sub.add_parser("videomme", help="VideoMME-format multiple choice")
    _add_model_arguments(p)
    p.add_argument("--questions", type=Path, required=True, help=".json/.jsonl/.parquet")
    p.add_argument("--videos", type=Path, required=True, help="folder of <videoID>.<ext>")
    p.add_argument("--subtitles", type=Path, help="folder of <videoID>.srt")
    p.add_argument("--variants", nargs="+", choices=VARIANTS, help="default: both if subtitles")
    p.add_argument("--mode", choices=MODES, default="generate")
    p.add_argument("--max-new-tokens", type=int, default=16)


def _caption_parser(sub) -> None:
    p = sub.add_parser("caption", help="captioning score (text metrics, optional LLM judge)")
    _add_model_arguments(p)
    p.add_argument("--items", type=Path, required=True, help=".json/.jsonl of video + caption")
    p.add_argument("--videos-root", type=Path, help="video paths are relative to this")
    p.add_argument("--judge", type=Path, help="local Hugging Face causal-LM folder")
    p.add_argument("--prompt", default=CaptionSettings.prompt)
    p.add_argument("--max-new-tokens", type=int, default=256)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="longvila-eval", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    _needle_parser(sub)
    _videomme_parser(sub)
    _caption_parser(sub)
    return parser.parse_args(argv)


def load_predictor(args: argparse.Namespace) -> GeneratorPredictor:
    """Initialize the layout, load the checkpoint, wrap it as a predictor."""
    generator, topology, tokenizer_path = load_generator(args, platform.dtype_from_name(args.dtype))
    description = {
        "checkpoint": str(args.checkpoint),
        "tokenizer": str(tokenizer_path),
        "dtype": args.dtype,
        "layout": {"tp": topology.tp, "ulysses": topology.ulysses, "ring": topology.ring},
    }
    return GeneratorPredictor(generator, description)


def _haystack(args: argparse.Namespace) -> Haystack:
    if args.haystack is not None:
        return Haystack(args.haystack)
    frames = args.haystack_frames or 2 * max(args.frame_counts)
    path = args.output.with_name(f"{args.output.stem}_haystack.mp4")
    if is_rank0():
        size = args.haystack_size
        write_synthetic_haystack(path, frames, size, size, seed=args.seed)
    if dist.get_world_size() > 1:
        dist.barrier()
    return Haystack(path)


def run_needle(args: argparse.Namespace, haystack: Haystack, predictor: GeneratorPredictor) -> dict:
    settings = NeedleSettings(
        frame_counts=args.frame_counts,
        depths=args.depths,
        trials=args.trials,
        needle_frames=args.needle_frames,
        scoring=args.scoring,
        num_options=args.num_options,
        needle_range=args.needle_range,
        question=args.question,
        seed=args.seed,
    )
    summary = run_needle_eval(predictor, haystack, settings, args.output, resume=not args.restart)
    if is_rank0():
        heatmap = args.heatmap or args.output.with_suffix(".png")
        grid = summary["grid"]
        plot_needle_heatmap(
            grid["accuracy"],
            args.frame_counts,
            args.depths,
            heatmap,
            by_frames=[summary["accuracy_by_frames"][str(n)] for n in args.frame_counts],
            chance=summary["chance"],
        )
        summary["heatmap"] = str(heatmap)
    return summary


def run_videomme_cli(
    args: argparse.Namespace, questions: list[VideoMMEQuestion], predictor: GeneratorPredictor
) -> dict:
    variants = args.variants or (list(VARIANTS) if args.subtitles else ["without_subtitles"])
    settings = VideoMMESettings(args.num_frames, args.mode, variants, args.max_new_tokens)
    return run_videomme(
        predictor,
        questions,
        args.videos,
        settings,
        args.output,
        subtitles=args.subtitles,
        resume=not args.restart,
    )


def run_caption(args: argparse.Namespace, items: list, predictor: GeneratorPredictor) -> dict:
    judge = HFCausalLMJudge(args.judge) if args.judge is not None and is_rank0() else None
    settings = CaptionSettings(args.prompt, args.num_frames, args.max_new_tokens)
    return run_captioning(predictor, items, settings, args.output, judge, resume=not args.restart)


def check_inputs(args: argparse.Namespace) -> None:
    """Fail on a missing input before the model is loaded."""
    files = {"haystack": "haystack video", "questions": "question file", "items": "caption file"}
    folders = {
        "videos": "video folder",
        "subtitles": "subtitle folder",
        "judge": "caption judge folder",
    }
    for name, what in files.items():
        path = getattr(args, name, None)
        if path is not None and not path.is_file():
            raise FileNotFoundError(f"{what} {path} does not exist")
    for name, what in folders.items():
        path = getattr(args, name, None)
        if path is not None and not path.is_dir():
            raise FileNotFoundError(f"{what} {path} does not exist")


#: command: (read its inputs, before the model loads; run it on them)
COMMANDS = {
    "needle": (_haystack, run_needle),
    "videomme": (lambda args: load_questions(args.questions), run_videomme_cli),
    "caption": (lambda args: load_caption_items(args.items, args.videos_root), run_caption),
}


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def format_summary(command: str, summary: dict, output: Path) -> str:
    """A short human-readable report of ``summary`` (the JSON has everything)."""
    lines = []
    if command == "needle":
        grid = summary["grid"]
        lines.append(
            "| depth | " + " | ".join(f"{n} frames" for n in grid["columns_frames"]) + " |"
        )
        lines.append("|---:|" + "---:|" * len(grid["columns_frames"]))
        for depth, row in zip(grid["rows_depths"], grid["accuracy"]):
            lines.append(f"| {100 * depth:g}% | " + " | ".join(_percent(a) for a in row) + " |")
        chance = f" (chance {_percent(summary['chance'])})" if summary["chance"] else ""
        lines.append(
            f"accuracy {_percent(summary['accuracy'])}{chance}; heatmap {summary['heatmap']}"
        )
    elif command == "videomme":
        for variant, result in summary.items():
            durations = ", ".join(
                f"{d} {_percent(r['accuracy'])} ({r['questions']})"
                for d, r in result["by_duration"].items()
            )
            lines.append(
                f"{variant}: {_percent(result['accuracy'])} of {result['questions']} "
                f"[{durations}]; unparsed {result['unparsed']}, skipped {result['skipped']}"
            )
    else:
        metrics = summary.get("metrics", {})
        lines.append(
            f"{summary['captions']} captions, {summary['skipped']} skipped; "
            + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())
        )
        if "judge" in summary:
            lines.append(f"judge score (0-5): {summary['judge']['score']}")
    lines.append(f"results: {output}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cpu_adaptations.adapt_megatron_for_cpu()
    platform.init_distributed()
    try:
        check_inputs(args)
        read_inputs, run = COMMANDS[args.command]
        inputs = read_inputs(args)  # a bad question file fails in seconds, not after the model
        summary = run(args, inputs, load_predictor(args))
    except (
        CheckpointError,
        ConfigError,
        ValueError,
        VideoDecodeError,
        FileNotFoundError,
        ImportError,
    ) as exc:
        if is_rank0():
            print(f"error: {exc}", file=sys.stderr)
        dist.destroy_process_group()
        return 2
    if is_rank0():
        print(format_summary(args.command, summary, args.output), flush=True)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
