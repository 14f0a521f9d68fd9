"""Resize (pad or crop) and normalize frames to the vision tower's square input.

``pad``:  scale so the longer side equals ``image_size``, then pad the shorter side equally on
          both ends with the mean colour (zero after normalization), like LLaVA's
          ``expand2square``.
``crop``: scale so the shorter side equals ``image_size``, then cut the centre square.

Scaling happens while decoding (swscale for video frames, PIL for images), so only the small
frame is converted to float; frames decoded at another size are scaled by :func:`scale_frames`
(PIL, as images are).
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence

import numpy as np
import torch


class ImageDecodeError(ValueError):
    """An image part that PIL cannot decode."""


def scaled_size(width: int, height: int, image_size: int, mode: str) -> tuple[int, int]:
    """(width, height) to scale a ``width × height`` frame to before padding or cropping."""
    if mode == "pad":
        scale = image_size / max(width, height)
        return (
            min(image_size, max(1, round(width * scale))),
            min(image_size, max(1, round(height * scale))),
        )
    if mode == "crop":
        scale = image_size / min(width, height)
        return max(image_size, round(width * scale)), max(image_size, round(height * scale))
    raise ValueError(f"resize mode must be 'pad' or 'crop', got {mode!r}")


def _new_output(shape: tuple[int, ...]) -> torch.Tensor:
    """float32 tensor; in a DataLoader worker it lives in shared memory, so sending it to the
    training process costs no copy (as torch's default collate does)."""
    if torch.utils.data.get_worker_info() is None:
        return torch.empty(shape, dtype=torch.float32)
    storage = torch.empty(0)._typed_storage()._new_shared(math.prod(shape))
    return torch.empty(0).new(storage).resize_(*shape)


def to_tower_input(
    frames: Sequence[torch.Tensor],
    image_size: int,
    mode: str,
    mean: Sequence[float],
    std: Sequence[float],
) -> torch.Tensor:
    """uint8 frames, each [3, h, w] and already scaled by :func:`scaled_size` -> float32
    [n, 3, image_size, image_size], normalized as ``(x / 255 - mean) / std``.

    One pass per frame writes the output (uint8 read, float written), which matters at
    hundreds of frames per sample.
    """
    if not frames:
        raise ValueError("no frames given")
    _, h, w = frames[0].shape
    if any(f.shape != (3, h, w) or f.dtype != torch.uint8 for f in frames):
        raise ValueError(
            f"frames must all be uint8 [3, {h}, {w}], got {[tuple(f.shape) for f in frames][:4]}"
        )
    std_t = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    scale = 1.0 / (255.0 * std_t)
    shift = -torch.tensor(mean, dtype=torch.float32).view(3, 1, 1) / std_t
    out = _new_output((len(frames), 3, image_size, image_size))
    if mode == "crop":
        top, left = (h - image_size) // 2, (w - image_size) // 2
        crop = (slice(None), slice(top, top + image_size), slice(left, left + image_size))
        for i, frame in enumerate(frames):
            torch.addcmul(shift, frame[crop], scale, out=out[i])
        return out
    top, left = (image_size - h) // 2, (image_size - w) // 2
    # Padding is the mean colour, which normalizes to exactly zero.
    out[:, :, :top].zero_()
    out[:, :, top + h :].zero_()
    out[:, :, top : top + h, :left].zero_()
    out[:, :, top : top + h, left + w :].zero_()
    for i, frame in enumerate(frames):
        torch.addcmul(shift, frame, scale, out=out[i, :, top : top + h, left : left + w])
    return out


def _scale_rgb(rgb, image_size: int, mode: str):
    """A PIL RGB image scaled for ``mode`` (bilinear)."""
    from PIL import Image

    return rgb.resize(scaled_size(*rgb.size, image_size, mode), Image.Resampling.BILINEAR)


def scale_frames(frames: Sequence[torch.Tensor], image_size: int, mode: str) -> list[torch.Tensor]:
    """uint8 frames [3, h, w] of any size -> uint8 [3, h', w'] scaled by :func:`scaled_size`
    (bilinear, as :func:`decode_image` scales images), ready for :func:`to_tower_input`. Frames
    already at that size are returned as they are."""
    from PIL import Image

    scaled = []
    for frame in frames:
        _, h, w = frame.shape
        if scaled_size(w, h, image_size, mode) == (w, h):
            scaled.append(frame)
            continue
        rgb = Image.fromarray(frame.permute(1, 2, 0).contiguous().numpy())
        array = np.asarray(_scale_rgb(rgb, image_size, mode)).copy()
        scaled.append(torch.from_numpy(array).permute(2, 0, 1))
    return scaled


def decode_image(data: bytes, image_size: int, mode: str) -> torch.Tensor:
    """Decode an encoded image (jpg/png/...) and scale it for ``mode`` -> uint8 [3, h, w]."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as img:
            rgb = _scale_rgb(img.convert("RGB"), image_size, mode)
    except Exception as exc:
        raise ImageDecodeError(f"cannot decode image: {type(exc).__name__}: {exc}") from exc
    return torch.from_numpy(np.asarray(rgb).copy()).permute(2, 0, 1)
