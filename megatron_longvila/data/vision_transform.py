"""Resize (pad or crop) and normalize frames to the vision tower's square input.

``pad``:  scale so the longer side equals ``image_size``, then pad the shorter side equally on
          both ends with the mean colour (zero after normalization), like LLaVA's
          ``expand2square``.
``crop``: scale so the shorter side equals ``image_size``, then cut the centre square.

Scaling happens while decoding (swscale for video frames, PIL for images); frames decoded at
another size are scaled by :func:`scale_frames` (PIL, as images are). The loader stops at
uint8 (:func:`fit_frames`: a quarter of the bytes, no float pass on the CPU); the model's first
stage pads and normalizes them with :func:`to_tower_input` on its own device.
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


def _new_output(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A CPU tensor; in a DataLoader worker it lives in shared memory, so sending it to the
    training process costs no copy (as torch's default collate does)."""
    if torch.utils.data.get_worker_info() is None:
        return torch.empty(shape, dtype=dtype)
    storage = torch.UntypedStorage._new_shared(math.prod(shape) * dtype.itemsize)
    return torch.empty(0, dtype=dtype).set_(storage).view(shape)


def _check_uint8_frames(frames: Sequence[torch.Tensor]) -> tuple[int, int]:
    if len(frames) == 0:
        raise ValueError("no frames given")
    _, h, w = frames[0].shape
    if any(tuple(f.shape) != (3, h, w) or f.dtype != torch.uint8 for f in frames):
        raise ValueError(
            f"frames must all be uint8 [3, {h}, {w}], got {[tuple(f.shape) for f in frames][:4]}"
        )
    return h, w


def fit_frames(frames: Sequence[torch.Tensor], image_size: int, mode: str) -> torch.Tensor:
    """uint8 frames, each [3, h, w] and already scaled by :func:`scaled_size` -> uint8
    [n, 3, h', w'], what the loader delivers: ``crop`` cuts the centre square (h' = w' =
    ``image_size``); ``pad`` keeps the frames as they are (the longer side is ``image_size``),
    and :func:`to_tower_input` centres them on a square of the mean colour where they are
    normalized (on the model's device).

    The result is channels-last in memory (a ``[n, h', w', 3]`` buffer viewed as
    ``[n, 3, h', w']``): decoded frames are interleaved RGB, so each frame is one plain copy;
    the model's device does the transposition as it normalizes.
    """
    h, w = _check_uint8_frames(frames)
    rows, columns = slice(None), slice(None)
    if mode == "crop":
        top, left = (h - image_size) // 2, (w - image_size) // 2
        rows, columns = slice(top, top + image_size), slice(left, left + image_size)
        h = w = image_size
    out = _new_output((len(frames), h, w, 3), torch.uint8)
    for i, frame in enumerate(frames):
        out[i].copy_(frame.permute(1, 2, 0)[rows, columns])
    return out.permute(0, 3, 1, 2)


def to_tower_input(
    frames: torch.Tensor | Sequence[torch.Tensor],
    image_size: int,
    mode: str,
    mean: Sequence[float],
    std: Sequence[float],
) -> torch.Tensor:
    """uint8 frames ([n, 3, h, w], or n of [3, h, w]) scaled by :func:`scaled_size` -> float32
    [n, 3, image_size, image_size] on the frames' device, normalized as ``(x / 255 - mean) /
    std``; ``pad`` centres them on the mean colour (zero after normalization), ``crop`` cuts the
    centre square. One pass reads the uint8 and writes the float output.
    """
    if isinstance(frames, torch.Tensor):
        shape = tuple(frames.shape)
        if len(shape) != 4 or frames.dtype != torch.uint8 or shape[0] < 1 or shape[1] != 3:
            raise ValueError(f"frames must be uint8 [n >= 1, 3, h, w], got {frames.dtype} {shape}")
        pixels = frames
    else:
        _check_uint8_frames(frames)
        pixels = torch.stack(list(frames))
    h, w = pixels.shape[2:]
    device = pixels.device
    std_t = torch.tensor(std, dtype=torch.float32, device=device).view(3, 1, 1)
    scale = 1.0 / (255.0 * std_t)
    shift = -torch.tensor(mean, dtype=torch.float32, device=device).view(3, 1, 1) / std_t
    if mode == "crop":
        top, left = (h - image_size) // 2, (w - image_size) // 2
        crop = pixels[:, :, top : top + image_size, left : left + image_size]
        return torch.addcmul(shift, crop, scale)
    top, left = (image_size - h) // 2, (image_size - w) // 2
    out = torch.zeros((len(pixels), 3, image_size, image_size), dtype=torch.float32, device=device)
    out[:, :, top : top + h, left : left + w] = torch.addcmul(shift, pixels, scale)
    return out


def _scale_rgb(rgb, image_size: int, mode: str):
    """A PIL RGB image scaled for ``mode`` (bilinear)."""
    from PIL import Image

    return rgb.resize(scaled_size(*rgb.size, image_size, mode), Image.Resampling.BILINEAR)


def scale_frames(frames: Sequence[torch.Tensor], image_size: int, mode: str) -> list[torch.Tensor]:
    """uint8 frames [3, h, w] of any size -> uint8 [3, h', w'] scaled by :func:`scaled_size`
    (bilinear, as :func:`decode_image` scales images), ready for :func:`fit_frames` or
    :func:`to_tower_input`. Frames
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
