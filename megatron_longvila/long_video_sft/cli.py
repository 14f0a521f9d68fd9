"""Build a long-video instruction dataset from a folder of raw videos: clips, clip captions,
a summary and question-answer pairs per video, written as Energon-ready webdataset shards.

    longvila-build-sft videos/ out/long_sft \\
        --captioner hf:models/some-vlm --text-model models/some-llm --workers 4

Resumable: finished videos are stored in the work folder (default: OUT.work) and skipped when
the build is run again with the same settings. Bad videos are listed and skipped. See
``megatron_longvila.long_video_sft`` for the steps and the output format
(``tools/build_long_video_sft.py`` runs the same command).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from megatron_longvila.long_video_sft.annotate import AnnotationConfig
from megatron_longvila.long_video_sft.build import BuildConfig, build_long_video_sft
from megatron_longvila.long_video_sft.clips import CLIP_METHODS, ClipConfig


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("video_root", help="folder of videos (searched recursively)")
    p.add_argument("out_dir", help="output folder for the shards")
    p.add_argument("--work-dir", default=None, help="results and report (default: OUT_DIR.work)")
    p.add_argument("--videos", default=None, help="text file listing videos, one path a line")
    p.add_argument(
        "--captioner",
        required=True,
        help="hf:FOLDER (Hugging Face vision-language model), longvila:CHECKPOINT (a LongVILA\n"
        "checkpoint: trainer save root, iter_* or HF LongVILA folder) or py:MODULE:FACTORY",
    )
    p.add_argument("--text-model", required=True, help="Hugging Face causal LM folder")
    p.add_argument("--templates", default=None, help="folder with caption/summary/qa.txt")
    p.add_argument("--workers", type=int, default=1, help="processes (0: in this process)")
    p.add_argument("--threads-per-worker", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, help="model dtype, e.g. bfloat16")
    p.add_argument("--max-shard-mb", type=float, default=1024.0)
    p.add_argument("--no-progress", action="store_true")
    a = p.add_argument_group("annotation")
    a.add_argument("--frames-per-clip", type=int, default=8)
    a.add_argument("--caption-max-side", type=int, default=448)
    a.add_argument("--num-questions", type=int, default=5)
    a.add_argument("--caption-tokens", type=int, default=128)
    a.add_argument("--summary-tokens", type=int, default=512)
    a.add_argument("--qa-tokens", type=int, default=768)
    c = p.add_argument_group("clips")
    c.add_argument("--clip-method", choices=CLIP_METHODS, default="scenes")
    c.add_argument("--scene-threshold", type=float, default=0.1)
    c.add_argument("--adaptive-ratio", type=float, default=3.0)
    c.add_argument("--analysis-fps", type=float, default=4.0, help="0: every frame")
    c.add_argument("--min-clip-s", type=float, default=2.0)
    c.add_argument("--max-clip-s", type=float, default=60.0)
    c.add_argument("--fixed-clip-s", type=float, default=10.0)
    return p.parse_args(argv)


def config_from_args(args: argparse.Namespace) -> BuildConfig:
    clips = ClipConfig(
        method=args.clip_method,
        threshold=args.scene_threshold,
        adaptive_ratio=args.adaptive_ratio,
        analysis_fps=args.analysis_fps or None,
        min_clip_s=args.min_clip_s,
        max_clip_s=args.max_clip_s,
        fixed_clip_s=args.fixed_clip_s,
    )
    annotation = AnnotationConfig(
        clips=clips,
        frames_per_clip=args.frames_per_clip,
        caption_max_side=args.caption_max_side,
        num_questions=args.num_questions,
        caption_tokens=args.caption_tokens,
        summary_tokens=args.summary_tokens,
        qa_tokens=args.qa_tokens,
    )
    return BuildConfig(
        captioner=args.captioner,
        text_model=args.text_model,
        templates_dir=args.templates,
        annotation=annotation,
        device=args.device,
        dtype=args.dtype,
        workers=args.workers,
        threads_per_worker=args.threads_per_worker,
        max_shard_bytes=int(args.max_shard_mb * (1 << 20)),
        progress=not args.no_progress,
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    work_dir = args.work_dir or str(args.out_dir).rstrip("/") + ".work"
    videos = None
    if args.videos:
        videos = [line.strip() for line in Path(args.videos).read_text().splitlines()]
        videos = [v for v in videos if v]
    report = build_long_video_sft(
        args.video_root, args.out_dir, work_dir, config_from_args(args), videos=videos
    )
    print(
        f"{report.videos} videos: {len(report.annotated)} annotated, {len(report.cached)} "
        f"finished before, {len(report.failed)} failed; {report.write.samples} samples in "
        f"{len(report.write.shards)} shards in {args.out_dir} (report: {work_dir}/report.json)"
    )
    for failure in report.failed:
        print(f"failed {failure.video}: {failure.reason}")
    for fallback in report.qa_fallbacks:
        print(f"QA not parsed, summary used instead: {fallback.video}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
