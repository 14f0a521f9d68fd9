"""Frames per second of the training loader (one worker) vs a bare PyAV decode of the same files.

    python tools/benchmark_loader.py --out runs/loader_benchmark [--sizes 320x240,1280x720]

For each video size and each frame count N (default 8, 64, 256 per video):

* bare: PyAV (single-threaded, as Energon opens containers) decodes the N uniformly spaced
  frames of each video from its bytes in memory, seeking to a keyframe only when the next
  frame lies beyond the next keyframe, and converts them to RGB arrays at native size. This is
  the least work that yields those frames.
* bare + resize: the same, with swscale scaling each frame to the size the loader makes.
* loader: ``build_train_loader`` with one worker process reads the same videos from shards,
  decodes the same frames (scaled while decoding, as uint8), tokenizes and batches. Timed from
  the first batch on (worker start-up excluded). Padding and normalization happen later, on
  the model's device in its first stage, and are not part of this time.

Each pass covers every video once; the best of ``--repeats`` passes is reported, since other
processes on a shared machine slow single passes down. The loader is timed in steady state
(passes back to back, its prefetch queue full) and never while the bare passes run.

Writes ``loader_benchmark.json`` and ``loader_benchmark.md`` to ``--out``.
"""

from __future__ import annotations

import argparse
import bisect
import io
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import av
import torch
from av.video.reformatter import VideoReformatter
from megatron.energon.av.av_init import av_open

from megatron_longvila.data.config import DataConfig
from megatron_longvila.data.loader import build_train_loader
from megatron_longvila.data.shard_writer import write_webdataset
from megatron_longvila.data.synthetic import (
    SyntheticVideoSpec,
    build_tiny_tokenizer,
    write_synthetic_video,
)
from megatron_longvila.data.video import probe_video, uniform_frame_indices
from megatron_longvila.data.vision_transform import scaled_size


def bare_decode(data: bytes, indices: list[int], out_size: tuple[int, int] | None = None) -> int:
    """Decode the frames at ``indices`` (presentation order) with plain PyAV into RGB arrays
    (scaled to ``out_size`` = (width, height) if given); seek to the keyframe before a frame only
    when that keyframe lies beyond the last decoded frame. Returns how many frames were made."""
    produced = 0
    width, height = out_size if out_size is not None else (None, None)
    reformatter = VideoReformatter()  # one swscale context for all frames, one thread
    with av_open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        entries = stream.index_entries
        # MP4 indexes every frame on open (decode timestamps, equal to presentation ones for
        # these videos without B-frames); other containers are demuxed once.
        if len(entries) == stream.frames:
            packets = [(entries[i].timestamp, entries[i].is_keyframe) for i in range(len(entries))]
        else:
            packets = [(p.pts, p.is_keyframe) for p in container.demux(stream) if p.pts is not None]
        frame_pts = sorted(pts for pts, _ in packets)
        keyframe_pts = sorted(pts for pts, key in packets if key)
        frames, last_pts = None, None
        for target in (frame_pts[i] for i in indices):
            keyframe = keyframe_pts[bisect.bisect_right(keyframe_pts, target) - 1]
            if frames is None or last_pts is None or keyframe > last_pts or target <= last_pts:
                container.seek(keyframe, stream=stream, backward=True)
                frames = container.decode(stream)
            for frame in frames:
                last_pts = frame.pts
                if frame.pts >= target:
                    reformatter.reformat(
                        frame, width, height, "rgb24", interpolation="BILINEAR", threads=1
                    ).to_ndarray()
                    produced += 1
                    break
    return produced


def time_bare(videos: list[bytes], num_frames: int, image_size: int | None) -> tuple[float, int]:
    """Seconds and frames of one bare pass over ``videos``; ``image_size`` also scales the
    frames as the loader does."""
    plans = []
    for data in videos:
        info = probe_video(data)
        size = scaled_size(info.width, info.height, image_size, "pad") if image_size else None
        plans.append((data, uniform_frame_indices(info.num_frames, num_frames), size))
    start = time.perf_counter()
    frames = sum(bare_decode(data, indices, size) for data, indices, size in plans)
    return time.perf_counter() - start, frames


def loader_windows(shards: Path, tokenizer: Path, num_frames: int, image_size: int):
    """Yields (seconds, frames) of successive passes over the data through the loader."""
    config = DataConfig(
        dataset_path=str(shards),
        tokenizer_path=str(tokenizer),
        num_frames=num_frames,
        image_size=image_size,
        tokens_per_frame=1,
        max_seq_length=num_frames + 4096,
        num_workers=1,
        micro_batch_size=1,
        repeat=True,
    )
    loader = build_train_loader(config, dp_rank=0, dp_size=1)
    batches = len(loader)
    iterator = iter(loader)
    next(iterator)  # worker start-up and the first sample are not timed
    while True:
        start = time.perf_counter()
        frames = sum(next(iterator).num_frames for _ in range(batches))
        yield time.perf_counter() - start, frames


def make_videos(
    folder: Path, count: int, frames: int, size: tuple[int, int], keyint: int, texture: int
):
    records = []
    for i in range(count):
        spec = SyntheticVideoSpec(
            num_frames=frames,
            width=size[0],
            height=size[1],
            fps=30,
            num_shapes=3,
            seed=i,
            keyframe_interval=keyint,
            texture=texture,
        )
        write_synthetic_video(folder / f"v{i}.mp4", spec)
        records.append(
            {
                "id": f"v{i}",
                "video": f"v{i}.mp4",
                "conversations": [
                    {"from": "human", "value": "<video>\nDescribe the video."},
                    {"from": "gpt", "value": "Shapes move."},
                ],
            }
        )
    (folder / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def markdown(results: dict) -> str:
    s = results["setup"]
    lines = [
        f"Loader vs bare PyAV decode, one worker, {s['videos']} videos of {s['frames_per_video']} "
        f"frames per size (H.264, keyframe every {s['keyframe_interval']}), frames scaled to fit "
        f"{s['image_size']}² and delivered as uint8, on {s['machine']}.",
        "",
        "| video | frames/video | bare PyAV | bare PyAV + same resize | loader | loader / bare | "
        "loader / bare + resize |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in results["rows"]:
        lines.append(
            f"| {row['video_size']} | {row['frames_per_video']} | {row['bare_fps']:.1f} "
            f"| {row['bare_scaled_fps']:.1f} | {row['loader_fps']:.1f} | {row['ratio']:.2f} "
            f"| {row['ratio_scaled']:.2f} |"
        )
    lines.append("")
    lines.append(
        f"Frames per second, best of {s['repeats']} passes over all videos; bare decoding runs "
        "in one process, the loader in one worker process."
    )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--out", default="runs/loader_benchmark", help="folder for JSON + markdown")
    parser.add_argument("--videos", type=int, default=8)
    parser.add_argument("--frames", type=int, default=512, help="frames per video")
    parser.add_argument(
        "--sizes", default="320x240,1280x720", help="video sizes WxH, comma-separated"
    )
    parser.add_argument("--keyint", type=int, default=30, help="keyframe interval")
    parser.add_argument(
        "--texture", type=int, default=48, help="texture amplitude (realistic bitrate)"
    )
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--counts", default="8,64,256", help="frames per video to sample")
    parser.add_argument("--repeats", type=int, default=5, help="timed passes; the best counts")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for size_name in args.sizes.split(","):
        rows += measure_size(args, tuple(int(v) for v in size_name.split("x")))
    results = {
        "setup": {
            "videos": args.videos,
            "frames_per_video": args.frames,
            "video_sizes": args.sizes.split(","),
            "keyframe_interval": args.keyint,
            "texture": args.texture,
            "image_size": args.image_size,
            "repeats": args.repeats,
            "machine": (
                f"{platform.machine()}, {os.cpu_count()} cores, python "
                f"{platform.python_version()}, PyAV {av.__version__}"
            ),
        },
        "rows": rows,
    }
    (out / "loader_benchmark.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "loader_benchmark.md").write_text(markdown(results))
    print(markdown(results))
    return 0


def measure_size(args: argparse.Namespace, size: tuple[int, int]) -> list[dict]:
    """The rows of one video size: every frame count, bare passes then loader passes."""
    rows = []
    with tempfile.TemporaryDirectory(prefix="mlv-loader-bench-") as tmp:
        tmp = Path(tmp)
        make_videos(tmp / "raw", args.videos, args.frames, size, args.keyint, args.texture)
        write_webdataset(tmp / "raw" / "samples.jsonl", tmp / "shards")
        build_tiny_tokenizer(tmp / "tokenizer")
        videos = [(tmp / "raw" / f"v{i}.mp4").read_bytes() for i in range(args.videos)]
        for count in (int(c) for c in args.counts.split(",")):
            fps = {"bare": [], "bare_scaled": [], "loader": []}
            for _ in range(args.repeats):  # interleaved, so load changes hit both alike
                for name, image_size in [("bare", None), ("bare_scaled", args.image_size)]:
                    seconds, frames = time_bare(videos, count, image_size)
                    fps[name].append(frames / seconds)
            # The loader runs after, never beside the bare passes: its worker would take CPU
            # from them and prefetch batches ahead of its own timing.
            windows = loader_windows(tmp / "shards", tmp / "tokenizer", count, args.image_size)
            for _ in range(args.repeats):
                seconds, frames = next(windows)
                fps["loader"].append(frames / seconds)
            windows.close()
            assert frames == min(count, args.frames) * args.videos, frames
            row = {
                "video_size": f"{size[0]}x{size[1]}",
                "frames_per_video": count,
                **{f"{k}_fps": max(v) for k, v in fps.items()},
            }
            row["ratio"] = row["loader_fps"] / row["bare_fps"]
            row["ratio_scaled"] = row["loader_fps"] / row["bare_scaled_fps"]
            row["all_fps"] = fps
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


if __name__ == "__main__":
    sys.exit(main())
