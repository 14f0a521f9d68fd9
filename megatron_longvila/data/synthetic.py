"""Synthetic long videos (moving coloured shapes, optional needle frames) encoded with PyAV,
and a small caption/QA dataset made of them.

A needle is a run of frames showing an answer (digits/letters, :mod:`pixel_font`) in black on
white, placed at a relative depth of the video. Every video is encoded with a fixed keyframe
interval and no scene-cut keyframes (so frame-index seeking is exact, see ``video.py``).
Containers: ``.mp4`` (H.264), ``.mkv`` (H.264), ``.webm`` (VP9), ``.avi`` and ``.mov`` (MPEG-4
Part 2).
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import av
import numpy as np

from megatron_longvila.data.pixel_font import draw_text_centered

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 190, 60),
    "blue": (50, 80, 230),
    "yellow": (235, 220, 40),
    "purple": (150, 60, 200),
    "orange": (245, 140, 30),
    "cyan": (40, 210, 220),
    "white": (240, 240, 240),
}
SHAPES = ("square", "circle")
CODECS = {"mp4": "libx264", "mkv": "libx264", "webm": "libvpx-vp9", "avi": "mpeg4", "mov": "mpeg4"}


@dataclass
class MovingShape:
    kind: str
    colour: str
    size: int
    x: float
    y: float
    dx: float
    dy: float


@dataclass
class SyntheticVideoSpec:
    num_frames: int = 64
    width: int = 96
    height: int = 64
    fps: int = 8
    num_shapes: int = 2
    seed: int = 0
    #: Text shown on the needle frames (None: no needle).
    needle_text: str | None = None
    #: Where the needle starts, as a fraction of the video (0 = first frame, 1 = last).
    needle_depth: float = 0.5
    needle_frames: int = 1
    keyframe_interval: int = 16
    #: Amplitude of a random texture drifting under the shapes (0: flat background). Texture
    #: makes the encoder spend bits like on camera footage, so decoding costs what it would.
    texture: int = 0

    def __post_init__(self) -> None:
        if self.num_frames < 1 or self.width < 16 or self.height < 16 or self.fps < 1:
            raise ValueError(
                f"need num_frames >= 1, a frame of at least 16x16 and fps >= 1; got "
                f"{self.num_frames} frames {self.width}x{self.height} at {self.fps} fps"
            )
        if self.width % 2 or self.height % 2:
            raise ValueError(f"frame size must be even for yuv420p, got {self.width}x{self.height}")
        if not 0.0 <= self.needle_depth <= 1.0:
            raise ValueError(f"needle_depth must be in [0, 1], got {self.needle_depth}")
        if self.needle_text is not None and not 1 <= self.needle_frames <= self.num_frames:
            raise ValueError(
                f"needle_frames={self.needle_frames} must be in [1, num_frames={self.num_frames}]"
            )


@dataclass
class SyntheticVideo:
    """What was written: the spec, the shapes, and the frame indices of the needle."""

    path: Path
    spec: SyntheticVideoSpec
    shapes: list[MovingShape]
    needle_frame_indices: list[int] = field(default_factory=list)

    def caption(self) -> str:
        parts = [f"a {s.colour} {s.kind}" for s in self.shapes]
        listed = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
        return f"{listed[0].upper()}{listed[1:]} move across a dark background."


def needle_frame_range(spec: SyntheticVideoSpec) -> list[int]:
    if spec.needle_text is None:
        return []
    start = round(spec.needle_depth * (spec.num_frames - spec.needle_frames))
    return list(range(start, start + spec.needle_frames))


def make_shapes(spec: SyntheticVideoSpec) -> list[MovingShape]:
    rng = random.Random(spec.seed)
    colours = rng.sample(sorted(COLOURS), k=min(spec.num_shapes, len(COLOURS)))
    shapes = []
    for colour in colours:
        size = rng.randint(max(4, spec.height // 8), max(5, spec.height // 3))
        shapes.append(
            MovingShape(
                kind=rng.choice(SHAPES),
                colour=colour,
                size=size,
                x=rng.uniform(0, spec.width - size),
                y=rng.uniform(0, spec.height - size),
                dx=rng.uniform(-3, 3) or 1.0,
                dy=rng.uniform(-2, 2) or 1.0,
            )
        )
    return shapes


def _shape_position(shape: MovingShape, t: int, width: int, height: int) -> tuple[int, int]:
    """Position at frame t, bouncing off the edges (a triangle wave per axis)."""

    def bounce(start: float, speed: float, span: int) -> int:
        if span <= 0:
            return 0
        pos = (start + speed * t) % (2 * span)
        return int(pos if pos <= span else 2 * span - pos)

    return bounce(shape.x, shape.dx, width - shape.size), bounce(
        shape.y, shape.dy, height - shape.size
    )


def render_frames(spec: SyntheticVideoSpec, shapes: list[MovingShape]) -> Iterator[np.ndarray]:
    """RGB frames [h, w, 3] uint8 in order."""
    needles = set(needle_frame_range(spec))
    yy, xx = np.mgrid[0 : spec.height, 0 : spec.width]
    base = np.zeros((spec.height, spec.width, 3), dtype=np.int16)
    base[..., 2] = (30 + 30 * yy / spec.height).astype(np.int16)
    base[..., :2] = 20
    texture = np.random.default_rng(spec.seed).integers(
        0, spec.texture + 1, size=(spec.height, spec.width, 3), dtype=np.int16
    )
    for t in range(spec.num_frames):
        if t in needles:
            frame = np.full((spec.height, spec.width, 3), 255, dtype=np.uint8)
            draw_text_centered(frame, spec.needle_text, (0, 0, 0))
            yield frame
            continue
        shifted = np.roll(texture, shift=(t, 2 * t), axis=(0, 1)) if spec.texture else 0
        frame = np.clip(base + shifted, 0, 255).astype(np.uint8)
        for shape in shapes:
            x, y = _shape_position(shape, t, spec.width, spec.height)
            if shape.kind == "square":
                frame[y : y + shape.size, x : x + shape.size] = COLOURS[shape.colour]
            else:
                r = shape.size / 2
                inside = (yy - (y + r)) ** 2 + (xx - (x + r)) ** 2 <= r * r
                frame[inside] = COLOURS[shape.colour]
        yield frame


def write_synthetic_video(path: str | Path, spec: SyntheticVideoSpec) -> SyntheticVideo:
    """Encode the video to ``path``; the codec follows the extension (see ``CODECS``)."""
    path = Path(path)
    ext = path.suffix.lstrip(".").lower()
    if ext not in CODECS:
        raise ValueError(f"unsupported container .{ext}; choose one of {sorted(CODECS)}")
    path.parent.mkdir(parents=True, exist_ok=True)
    shapes = make_shapes(spec)
    options = {"g": str(spec.keyframe_interval), "sc_threshold": "0"}
    if CODECS[ext] == "libx264":
        k = spec.keyframe_interval
        options = {"x264-params": f"keyint={k}:min-keyint={k}:scenecut=0", "preset": "ultrafast"}
    with av.open(str(path), "w") as container:
        stream = container.add_stream(CODECS[ext], rate=spec.fps, options=options)
        stream.width, stream.height = spec.width, spec.height
        stream.pix_fmt = "yuv420p"
        stream.codec_context.gop_size = spec.keyframe_interval
        for frame in render_frames(spec, shapes):
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return SyntheticVideo(path, spec, shapes, needle_frame_range(spec))


def make_synthetic_dataset(
    out_dir: str | Path,
    num_videos: int = 8,
    num_frames: int = 48,
    width: int = 64,
    height: int = 64,
    containers: tuple[str, ...] = ("mp4",),
    needle_fraction: float = 0.5,
    seed: int = 0,
) -> Path:
    """Videos under ``out_dir/videos`` and ``out_dir/samples.jsonl`` with one conversation per
    video: a caption question, or (for ``needle_fraction`` of them) "which number appears".
    Returns the JSONL path; its records have ``id``, ``video`` (relative path) and
    ``conversations``."""
    out_dir = Path(out_dir)
    rng = random.Random(seed)
    records = []
    for i in range(num_videos):
        ext = containers[i % len(containers)]
        needle = str(rng.randint(0, 99)) if rng.random() < needle_fraction else None
        spec = SyntheticVideoSpec(
            num_frames=num_frames,
            width=width,
            height=height,
            seed=seed * 100_003 + i,
            needle_text=needle,
            needle_depth=rng.random(),
            needle_frames=max(1, num_frames // 8),
        )
        relative = f"videos/video_{i:05d}.{ext}"
        video = write_synthetic_video(out_dir / relative, spec)
        if needle is None:
            question, answer = "Describe the video.", video.caption()
        else:
            question, answer = "What number appears in the video?", needle
        records.append(
            {
                "id": f"synthetic_{i:05d}",
                "video": relative,
                "conversations": [
                    {"from": "human", "value": f"<video>\n{question}"},
                    {"from": "gpt", "value": answer},
                ],
                "needle_frames": video.needle_frame_indices,
            }
        )
    jsonl = out_dir / "samples.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in records))
    return jsonl


def make_synthetic_shards(out_dir: str | Path, max_shard_bytes: int = 1 << 20, **dataset_kwargs):
    """:func:`make_synthetic_dataset` under ``out_dir/raw`` turned into Energon-ready shards in
    ``out_dir/shards``; returns the :class:`~megatron_longvila.data.shard_writer.WriteReport`."""
    from megatron_longvila.data.shard_writer import write_webdataset

    out_dir = Path(out_dir)
    jsonl = make_synthetic_dataset(out_dir / "raw", **dataset_kwargs)
    return write_webdataset(
        jsonl, out_dir / "shards", media_root=out_dir / "raw", max_shard_bytes=max_shard_bytes
    )


def make_passkey_text_dataset(
    out_dir: str | Path, num_samples: int = 16, filler_lines: int = 40, seed: int = 0
) -> Path:
    """Text-only long-context samples (for context extension): a pass key hidden at a random
    depth of filler text, then the question. Writes ``out_dir/samples.jsonl`` and returns it."""
    from megatron_longvila.data.tokenizer import tiny_corpus

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    filler = tiny_corpus(lines=filler_lines * 4, seed=seed)
    records = []
    for i in range(num_samples):
        key = str(rng.randint(1000, 9999))
        lines = rng.sample(filler, filler_lines)
        lines.insert(rng.randrange(filler_lines + 1), f"The pass key is {key}. Remember it.")
        records.append(
            {
                "id": f"passkey_{i:05d}",
                "conversations": [
                    {"from": "human", "value": " ".join(lines) + "\nWhat is the pass key?"},
                    {"from": "gpt", "value": key},
                ],
            }
        )
    jsonl = out_dir / "samples.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in records))
    return jsonl
