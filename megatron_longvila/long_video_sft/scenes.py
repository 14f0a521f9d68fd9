"""Scene cuts by frame difference: decode the video once in order, compare small grayscale
frames taken at a reduced rate, and call a cut where the difference jumps.

The difference of two samples is the mean absolute difference of their grayscale thumbnails,
scaled to [0, 1]. A cut needs both an absolute level (``threshold``) and a jump over the local
motion level (``adaptive_ratio`` × the median difference of the ``window`` samples on either
side), so fast camera motion, which raises every difference around it, is not taken for a cut.
A cut is placed at the first sampled frame of the new scene, so its frame is exact to within
one sampling step (``step`` frames).
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from av.video.reformatter import VideoReformatter
from megatron.energon.av.av_init import av_open

from megatron_longvila.data.video import VideoDecodeError


@dataclass(frozen=True)
class FrameDifferences:
    """``values[i]``: difference between sampled frames ``positions[i] - step`` and
    ``positions[i]``; ``num_frames``: frames decoded in total."""

    positions: np.ndarray  # [n] int, frame index of the later frame of each pair
    values: np.ndarray  # [n] float in [0, 1]
    num_frames: int


def thumbnail_size(width: int, height: int, thumb_width: int) -> tuple[int, int]:
    """(w, h) of a thumbnail at most ``thumb_width`` wide with the frame's aspect ratio."""
    w = min(thumb_width, width)
    return w, max(1, round(height * w / width))


def frame_differences(data: bytes, step: int, thumb_width: int = 64) -> FrameDifferences:
    """Decode every frame in order (a decoder cannot skip), thumbnail every ``step``-th one as
    grayscale, and return the differences of consecutive thumbnails."""
    if step < 1:
        raise ValueError(f"step={step} must be >= 1")
    positions, values = [], []
    previous = None
    count = 0
    try:
        with av_open(io.BytesIO(data)) as container:
            if not container.streams.video:
                raise VideoDecodeError("no video stream")
            stream = container.streams.video[0]
            size = None
            reformatter = VideoReformatter()  # one swscale context for the whole video
            for frame in container.decode(stream):
                if count % step == 0:
                    size = size or thumbnail_size(frame.width, frame.height, thumb_width)
                    # Area averaging: a thumbnail without aliasing flickers less under motion.
                    gray = reformatter.reformat(
                        frame, size[0], size[1], "gray", interpolation="AREA", threads=1
                    )
                    thumb = gray.to_ndarray().astype(np.int16)
                    if previous is not None:
                        positions.append(count)
                        values.append(np.abs(thumb - previous).mean() / 255.0)
                    previous = thumb
                count += 1
    except VideoDecodeError:
        raise
    except Exception as exc:  # PyAV raises many error types for broken files
        raise VideoDecodeError(
            f"decoding failed after {count} frames: {type(exc).__name__}: {exc}"
        ) from exc
    return FrameDifferences(np.asarray(positions, dtype=np.int64), np.asarray(values), count)


def detect_cuts(
    diffs: FrameDifferences, threshold: float, adaptive_ratio: float, window: int = 2
) -> list[int]:
    """Frame indices where a new scene starts (ascending); see the module docstring."""
    values = diffs.values
    cuts = []
    for i, value in enumerate(values):
        if value < threshold:
            continue
        neighbours = np.concatenate(
            [values[max(0, i - window) : i], values[i + 1 : i + 1 + window]]
        )
        local = float(np.median(neighbours)) if neighbours.size else 0.0
        if value >= adaptive_ratio * local:
            cuts.append(int(diffs.positions[i]))
    return cuts
