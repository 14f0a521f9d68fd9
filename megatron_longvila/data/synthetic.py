"""Data made locally for tests and the demo: synthetic long videos (moving coloured shapes,
optional needle frames, optional hard scene cuts) encoded with PyAV, a small caption/QA dataset
made of them, long pass-key text, and tiny tokenizers trained on a generated corpus. Nothing is
downloaded.

A scene cut starts a new scene at a known frame: a background of another brightness and colour
and shapes of their own, so consecutive scenes differ strongly (shot splitting is tested on them).
A needle is a run of frames showing an answer (digits/letters, :mod:`pixel_font`) in black on
white, placed at a relative depth of the video. Every video is encoded with a fixed keyframe
interval and no scene-cut keyframes (so frame-index seeking is exact, see ``video.py``).
Containers: ``.mp4`` (H.264), ``.mkv`` (H.264), ``.webm`` (VP9), ``.avi`` and ``.mov`` (MPEG-4
Part 2).
"""

from __future__ import annotations

import bisect
import itertools
import json
import random
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import av
import numpy as np

from megatron_longvila.data.chat_template import all_template_markers
from megatron_longvila.data.pixel_font import draw_text_centered
from megatron_longvila.data.tokenizer import IMAGE_TOKEN, PAD_TOKEN, VIDEO_TOKEN

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
#: Flat backgrounds of the scenes after the first (which keeps the dark blue gradient): bright
#: for odd scenes, dark for even ones, so every cut changes the brightness a lot.
SCENE_BACKGROUNDS = {
    "bright": ((215, 205, 160), (170, 220, 235), (235, 180, 195)),
    "dark": ((95, 30, 25), (20, 85, 40), (60, 40, 110)),
}
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
    #: Frames at which a new scene starts (ascending, inside (0, num_frames)); none: one scene.
    scene_starts: tuple[int, ...] = ()

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
        self.scene_starts = tuple(self.scene_starts)
        bounds = (0, *self.scene_starts, self.num_frames)
        if any(b <= a for a, b in itertools.pairwise(bounds)):
            raise ValueError(
                f"scene_starts={self.scene_starts} must ascend strictly inside "
                f"(0, num_frames={self.num_frames})"
            )


@dataclass
class SyntheticVideo:
    """What was written: the spec, the shapes of each scene, and the frame indices of the
    needle."""

    path: Path
    spec: SyntheticVideoSpec
    scenes: list[list[MovingShape]]
    needle_frame_indices: list[int] = field(default_factory=list)

    def caption(self, scene: int = 0) -> str:
        parts = [f"a {s.colour} {s.kind}" for s in self.scenes[scene]]
        listed = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
        shade = "bright" if scene % 2 else "dark"
        return f"{listed[0].upper()}{listed[1:]} move across a {shade} background."


def needle_frame_range(spec: SyntheticVideoSpec) -> list[int]:
    if spec.needle_text is None:
        return []
    start = round(spec.needle_depth * (spec.num_frames - spec.needle_frames))
    return list(range(start, start + spec.needle_frames))


def make_shapes(spec: SyntheticVideoSpec, scene: int = 0) -> list[MovingShape]:
    rng = random.Random(spec.seed if scene == 0 else f"{spec.seed}/scene{scene}")
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


def make_scenes(spec: SyntheticVideoSpec) -> list[list[MovingShape]]:
    """The shapes of every scene (one scene per cut plus one)."""
    return [make_shapes(spec, scene) for scene in range(len(spec.scene_starts) + 1)]


def _scene_background(spec: SyntheticVideoSpec, scene: int) -> np.ndarray:
    """[h, w, 3] int16: a dark blue gradient for scene 0, flat colours after a cut."""
    base = np.zeros((spec.height, spec.width, 3), dtype=np.int16)
    if scene == 0:
        yy = np.arange(spec.height)[:, None]
        base[..., 2] = (30 + 30 * yy / spec.height).astype(np.int16)
        base[..., :2] = 20
        return base
    palette = SCENE_BACKGROUNDS["bright" if scene % 2 else "dark"]
    base[:] = palette[(scene - 1) // 2 % len(palette)]
    return base


def render_frames(
    spec: SyntheticVideoSpec, scenes: list[list[MovingShape]]
) -> Iterator[np.ndarray]:
    """RGB frames [h, w, 3] uint8 in order; shapes restart their paths at each scene cut."""
    needles = set(needle_frame_range(spec))
    yy, xx = np.mgrid[0 : spec.height, 0 : spec.width]
    backgrounds = [_scene_background(spec, scene) for scene in range(len(scenes))]
    starts = (0, *spec.scene_starts)
    texture = np.random.default_rng(spec.seed).integers(
        0, spec.texture + 1, size=(spec.height, spec.width, 3), dtype=np.int16
    )
    for t in range(spec.num_frames):
        if t in needles:
            frame = np.full((spec.height, spec.width, 3), 255, dtype=np.uint8)
            draw_text_centered(frame, spec.needle_text, (0, 0, 0))
            yield frame
            continue
        scene = bisect.bisect_right(starts, t) - 1
        shifted = np.roll(texture, shift=(t, 2 * t), axis=(0, 1)) if spec.texture else 0
        frame = np.clip(backgrounds[scene] + shifted, 0, 255).astype(np.uint8)
        for shape in scenes[scene]:
            x, y = _shape_position(shape, t - starts[scene], spec.width, spec.height)
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
    scenes = make_scenes(spec)
    options = {"g": str(spec.keyframe_interval), "sc_threshold": "0"}
    if CODECS[ext] == "libx264":
        k = spec.keyframe_interval
        options = {"x264-params": f"keyint={k}:min-keyint={k}:scenecut=0", "preset": "ultrafast"}
    with av.open(str(path), "w") as container:
        stream = container.add_stream(CODECS[ext], rate=spec.fps, options=options)
        stream.width, stream.height = spec.width, spec.height
        stream.pix_fmt = "yuv420p"
        stream.codec_context.gop_size = spec.keyframe_interval
        for frame in render_frames(spec, scenes):
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return SyntheticVideo(path, spec, scenes, needle_frame_range(spec))


def make_synthetic_dataset(
    out_dir: str | Path,
    num_videos: int = 8,
    num_frames: int | Sequence[int] = 48,
    width: int = 64,
    height: int = 64,
    containers: tuple[str, ...] = ("mp4",),
    needle_fraction: float = 0.5,
    seed: int = 0,
    needle_range: int = 100,
    needle_frames: int | None = None,
) -> Path:
    """Videos under ``out_dir/videos`` and ``out_dir/samples.jsonl`` with one conversation per
    video: a caption question, or (for ``needle_fraction`` of them) "which number appears" — a
    number below ``needle_range`` shown on ``needle_frames`` frames (default an eighth of the
    video). ``num_frames`` is every video's length, or a sequence of lengths that the videos
    take in turn (video ``i`` has ``num_frames[i % len(num_frames)]``): mixed lengths.
    Returns the JSONL path; its records have ``id``, ``video`` (relative path) and
    ``conversations``."""
    out_dir = Path(out_dir)
    lengths = [num_frames] if isinstance(num_frames, int) else list(num_frames)
    if not lengths:
        raise ValueError("num_frames is an empty sequence; give at least one video length")
    rng = random.Random(seed)
    records = []
    for i in range(num_videos):
        ext = containers[i % len(containers)]
        frames = lengths[i % len(lengths)]
        needle = str(rng.randrange(needle_range)) if rng.random() < needle_fraction else None
        spec = SyntheticVideoSpec(
            num_frames=frames,
            width=width,
            height=height,
            seed=seed * 100_003 + i,
            needle_text=needle,
            needle_depth=rng.random(),
            needle_frames=needle_frames or max(1, frames // 8),
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


# ---- tiny tokenizers made locally (tests, demo) ---------------------------------------------

_TINY_CORPUS_TEXT = """
the a an is are was of in on at to and or with what which who where when how many much video
image frame frames scene shows show shown appears appear happens happen moving move moves shape
shapes square circle triangle colour color red green blue yellow white black orange purple cyan
magenta background left right up down top bottom centre center number word digit answer question
describe caption hidden needle haystack there one two three four five six seven eight nine zero
you helpful assistant user system please yes no it this that first last then while during across
slowly quickly bright dark large small
"""


def tiny_corpus(lines: int = 400, seed: int = 0) -> list[str]:
    """Generated English-like lines over a small vocabulary, with digits and punctuation."""
    rng = random.Random(seed)
    vocabulary = _TINY_CORPUS_TEXT.split()
    corpus = []
    for _ in range(lines):
        words = [rng.choice(vocabulary) for _ in range(rng.randint(3, 14))]
        if rng.random() < 0.3:
            words.insert(rng.randrange(len(words)), str(rng.randint(0, 9999)))
        corpus.append(" ".join(words).capitalize() + rng.choice([".", "?", "!", ","]))
    return corpus


def build_tiny_tokenizer(
    folder: str | Path,
    special_tokens: Iterable[str] = (),
    corpus: Iterable[str] | None = None,
    vocab_size: int = 600,
) -> Path:
    """Train a byte-level BPE on ``corpus`` (default :func:`tiny_corpus`) and save it as a
    Hugging Face tokenizer folder. Any text encodes (byte fallback); ``special_tokens`` plus
    the pad and media tokens are single ids. Nothing is downloaded."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = list(
        dict.fromkeys(
            [PAD_TOKEN, IMAGE_TOKEN, VIDEO_TOKEN, *all_template_markers(), *special_tokens]
        )
    )
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(corpus) if corpus is not None else tiny_corpus(), trainer)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD_TOKEN)
    hf.save_pretrained(str(folder))
    return folder


def build_tiny_sentencepiece(
    model_file: str | Path, corpus: Iterable[str] | None = None, vocab_size: int = 400
) -> Path:
    """Train a small sentencepiece BPE model at ``model_file`` (``.model``); its pieces know
    nothing of the pipeline's special tokens, which
    :class:`~megatron_longvila.data.tokenizer.SentencePieceTokenizer` appends."""
    import io

    import sentencepiece

    model_file = Path(model_file)
    if model_file.suffix != ".model":
        raise ValueError(f"sentencepiece model file must end in .model, got {model_file}")
    model_file.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(list(corpus) if corpus is not None else tiny_corpus()),
        model_writer=buffer,
        vocab_size=vocab_size,
        model_type="bpe",
        byte_fallback=True,
        character_coverage=1.0,
        minloglevel=2,
    )
    model_file.write_bytes(buffer.getvalue())
    return model_file
