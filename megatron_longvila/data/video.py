"""Video frames for the vision tower: probe, choose frame indices, decode them by seeking.

Decoding uses Megatron-Energon's :class:`~megatron.energon.av.AVDecoder`: for every requested
frame it seeks to the preceding keyframe (when the frame lies beyond the current position) and
decodes forward, and swscale resizes each frame while converting it to RGB. Only the frames
between a keyframe and a requested frame are decoded, never the whole video.

Probing reads the container header (frame count, rate, size) and demuxes packets only when the
container does not store a frame count (Matroska/WebM); it never decodes. Energon's own
``get_metadata`` decodes the first frame to learn the size, which costs one extra decode per
video.

One piece of Energon 7.4.1 is replaced (:class:`SeekingAVDecoder`): for Matroska/WebM it takes
the stream's own index, which FFmpeg fills only while packets are demuxed; right after opening it
holds just the first keyframe, so Energon's PTS reader never seeks and decodes every frame up to
each requested one (shown in ``tests/test_video_frames.py``). Here Matroska uses Energon's
``AVProbeIndex`` (keyframes found by demuxing packets, no decoding), as Energon already does for
AVI.

Known limit of Energon 7.4.1's frame-index seeking (kept, because it only bites in a rare
layout): in MP4 it looks keyframes up by decode timestamp but seeks by presentation timestamp, so
with B-frames a request landing right after two keyframes closer together than the B-frame delay
(e.g. x264 scene cuts one or two frames apart) returns a frame up to that distance earlier. The
synthetic videos of this package use fixed GOPs without scene-cut keyframes, so their frames are
exact (see ``tests/test_video_frames.py``).
"""

from __future__ import annotations

import io
import itertools
import math
from dataclasses import dataclass

import torch
from megatron.energon.av import AVDecoder
from megatron.energon.av.av_decoder import AVIndexMode
from megatron.energon.av.av_init import av_open

_MATROSKA = ("mkv", "webm")


class VideoDecodeError(ValueError):
    """A video that cannot be opened or does not yield the requested frames."""


class SeekingAVDecoder(AVDecoder):
    """Energon's AVDecoder, with a keyframe index that lets it seek in Matroska/WebM too."""

    def _inspect_index_mode(self) -> AVIndexMode:
        mode = super()._inspect_index_mode()
        return AVIndexMode.PROBE if self._get_extension() in _MATROSKA else mode


@dataclass(frozen=True)
class VideoInfo:
    num_frames: int
    fps: float
    width: int
    height: int

    @property
    def duration_s(self) -> float:
        return self.num_frames / self.fps


def probe_video(data: bytes) -> VideoInfo:
    """Frame count, rate and size of the first video stream, from the container (no decoding)."""
    try:
        with av_open(io.BytesIO(data)) as container:
            if not container.streams.video:
                raise VideoDecodeError("no video stream")
            stream = container.streams.video[0]
            rate = stream.average_rate or stream.guessed_rate
            width, height = stream.codec_context.width, stream.codec_context.height
            num_frames = stream.frames
            if num_frames <= 0:
                num_frames = sum(1 for p in container.demux(stream) if p.pts is not None)
    except VideoDecodeError:
        raise
    except Exception as exc:  # PyAV raises many error types for broken files
        raise VideoDecodeError(f"cannot open video: {type(exc).__name__}: {exc}") from exc
    if not rate or num_frames <= 0 or width <= 0 or height <= 0:
        raise VideoDecodeError(
            f"video stream without frames/rate/size (frames={num_frames}, rate={rate}, "
            f"size={width}x{height})"
        )
    return VideoInfo(num_frames=num_frames, fps=float(rate), width=width, height=height)


def frames_to_sample(
    info: VideoInfo, num_frames: int, fps: float | None = None, max_frames: int = 1024
) -> int:
    """How many frames to ask for: ``num_frames``, or ``duration × fps`` capped at
    ``max_frames`` when a target fps is given (at least one). May exceed the video's frames;
    :func:`uniform_frame_indices` then takes every frame."""
    if fps is None:
        return num_frames
    return max(1, min(max_frames, math.ceil(info.duration_s * fps)))


def uniform_frame_indices(total: int, wanted: int) -> list[int]:
    """``wanted`` frame indices spread uniformly over ``total`` frames: the middle frame of each
    of ``wanted`` equal segments. With fewer frames than wanted, every frame once."""
    if total < 1 or wanted < 1:
        raise ValueError(f"need total >= 1 and wanted >= 1, got total={total} wanted={wanted}")
    if wanted >= total:
        return list(range(total))
    return [int((i + 0.5) * total / wanted) for i in range(wanted)]


def decode_frames(
    data: bytes, indices: list[int], out_size: tuple[int, int] | None = None
) -> list[torch.Tensor]:
    """Decode the frames at ``indices`` (ascending) -> one uint8 [3, H, W] per index.

    ``out_size`` is (width, height) of the output (swscale bilinear), None for the native size.
    Raises :class:`VideoDecodeError` if any frame cannot be decoded.
    """
    if any(b <= a for a, b in itertools.pairwise(indices)):
        raise ValueError(f"frame indices must be strictly ascending, got {indices}")
    decoder = SeekingAVDecoder(io.BytesIO(data), suppress_warnings=True)
    try:
        clips, _ = decoder.get_video_clips(
            [(i, i) for i in indices], video_unit="frames", video_out_frame_size=out_size
        )
    except Exception as exc:
        raise VideoDecodeError(f"decoding failed: {type(exc).__name__}: {exc}") from exc
    if len(clips) != len(indices):
        raise VideoDecodeError(
            f"decoded {len(clips)} of {len(indices)} requested frames (last asked: {indices[-1]})"
        )
    return [clip[0] for clip in clips]


def check_video_readable(data: bytes) -> VideoInfo:
    """Probe the video and decode its first and last frame; raise :class:`VideoDecodeError` if
    it is unreadable or cut short."""
    info = probe_video(data)
    decode_frames(data, sorted({0, info.num_frames - 1}), out_size=(16, 16))
    return info
