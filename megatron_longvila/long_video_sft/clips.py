"""Splitting a video into clips: scene cuts with a minimum and maximum clip length, or clips
of a fixed length when no cut is found (or when asked).

Rules, in frames (seconds × fps, rounded):

* scenes: a cut that would close a clip shorter than ``min_clip_s`` is dropped (the two scenes
  become one clip), and so is the last cut when the final clip would be too short; a clip longer
  than ``max_clip_s`` is split into the fewest equal parts no longer than it.
* fixed: clips of ``fixed_clip_s`` from the start; a remainder shorter than ``min_clip_s``
  joins the clip before it.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

from megatron_longvila.data.video import VideoDecodeError, VideoInfo
from megatron_longvila.long_video_sft.scenes import detect_cuts, frame_differences

CLIP_METHODS = ("scenes", "fixed")


@dataclass
class ClipConfig:
    """How a video is cut into clips; see the module docstring."""

    #: "scenes": cut at scene changes (fixed-length clips when none is found); "fixed": always
    #: fixed-length clips.
    method: str = "scenes"
    #: Mean absolute grayscale difference in [0, 1] a cut must reach.
    threshold: float = 0.1
    #: ... and it must be this many times the median difference around it.
    adaptive_ratio: float = 3.0
    #: Rate at which frames are compared (None: every frame).
    analysis_fps: float | None = 4.0
    #: Width of the grayscale thumbnails compared.
    analysis_width: int = 64
    min_clip_s: float = 2.0
    max_clip_s: float = 60.0
    fixed_clip_s: float = 10.0

    def __post_init__(self) -> None:
        problems = []
        if self.method not in CLIP_METHODS:
            problems.append(f"method={self.method!r} is not one of {CLIP_METHODS}")
        if not 0.0 < self.threshold <= 1.0:
            problems.append(f"threshold={self.threshold} must be in (0, 1]")
        if self.adaptive_ratio < 0:
            problems.append(f"adaptive_ratio={self.adaptive_ratio} must be >= 0")
        if self.analysis_fps is not None and self.analysis_fps <= 0:
            problems.append(f"analysis_fps={self.analysis_fps} must be > 0 or None")
        if self.analysis_width < 8:
            problems.append(f"analysis_width={self.analysis_width} must be >= 8")
        if not 0 < self.min_clip_s <= self.fixed_clip_s <= self.max_clip_s:
            problems.append(
                f"need 0 < min_clip_s <= fixed_clip_s <= max_clip_s, got {self.min_clip_s}, "
                f"{self.fixed_clip_s}, {self.max_clip_s}"
            )
        if problems:
            raise ValueError("invalid ClipConfig: " + "; ".join(problems))


@dataclass(frozen=True)
class Clip:
    """Frames [start, end) of a video."""

    start: int
    end: int

    def seconds(self, fps: float) -> tuple[float, float]:
        return self.start / fps, self.end / fps


@dataclass(frozen=True)
class ClipPlan:
    clips: list[Clip]
    #: "scenes" or "fixed" (the fallback taken when no cut survived).
    method: str
    #: Every cut the detector found, before the length rules.
    cuts: list[int]


def clips_from_starts(starts: list[int], num_frames: int) -> list[Clip]:
    bounds = [*starts, num_frames]
    return [Clip(a, b) for a, b in itertools.pairwise(bounds)]


def starts_from_cuts(cuts: list[int], num_frames: int, min_frames: int) -> list[int]:
    """Clip starts (beginning with 0) from scene cuts, dropping cuts that leave a clip shorter
    than ``min_frames``."""
    starts = [0]
    for cut in sorted(cuts):
        if cut - starts[-1] >= min_frames and cut < num_frames:
            starts.append(cut)
    if len(starts) > 1 and num_frames - starts[-1] < min_frames:
        starts.pop()
    return starts


def split_long_clips(clips: list[Clip], max_frames: int) -> list[Clip]:
    """Each clip longer than ``max_frames`` split into the fewest equal parts that fit."""
    out = []
    for clip in clips:
        parts = math.ceil((clip.end - clip.start) / max_frames)
        bounds = [clip.start + round(i * (clip.end - clip.start) / parts) for i in range(parts)]
        out += clips_from_starts(bounds, clip.end)
    return out


def fixed_length_starts(num_frames: int, clip_frames: int, min_frames: int) -> list[int]:
    starts = list(range(0, num_frames, clip_frames))
    if len(starts) > 1 and num_frames - starts[-1] < min_frames:
        starts.pop()
    return starts


def plan_clips(cuts: list[int], num_frames: int, fps: float, config: ClipConfig) -> ClipPlan:
    """Clips of a video of ``num_frames`` at ``fps`` from its scene cuts (see module doc)."""

    def frames(seconds: float) -> int:
        return max(1, round(seconds * fps))

    min_frames = frames(config.min_clip_s)
    starts = [0]
    if config.method == "scenes":
        starts = starts_from_cuts(cuts, num_frames, min_frames)
    method = "scenes" if len(starts) > 1 else "fixed"
    if method == "fixed":
        starts = fixed_length_starts(num_frames, frames(config.fixed_clip_s), min_frames)
    clips = split_long_clips(clips_from_starts(starts, num_frames), frames(config.max_clip_s))
    return ClipPlan(clips, method, list(cuts))


def find_clips(data: bytes, info: VideoInfo, config: ClipConfig) -> ClipPlan:
    """Decode the video once, detect scene cuts (unless ``config.method`` is "fixed") and plan
    its clips. Raises :class:`VideoDecodeError` if fewer frames decode than the header states."""
    if config.method == "fixed":
        return plan_clips([], info.num_frames, info.fps, config)
    step = 1 if config.analysis_fps is None else max(1, round(info.fps / config.analysis_fps))
    diffs = frame_differences(data, step, config.analysis_width)
    if diffs.num_frames < info.num_frames:
        raise VideoDecodeError(
            f"only {diffs.num_frames} of the {info.num_frames} frames in the header decode"
        )
    cuts = detect_cuts(diffs, config.threshold, config.adaptive_ratio)
    return plan_clips(cuts, info.num_frames, info.fps, config)
