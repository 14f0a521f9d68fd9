"""The :class:`~.predictor.Predictor` of a real model: a
:class:`~megatron_longvila.inference.generator.Generator` under MM-SP.

Frames chosen by a harness (uint8 ``[n, 3, H, W]`` at any size) are resized and normalized here
exactly as the generator does for a video file — scaled to the vision tower's size by
``resize_mode`` (antialiased bilinear), then :func:`~megatron_longvila.data.vision_transform.
to_tower_input` — so a needle inserted between decoded frames looks like any other frame.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, replace
from typing import Any

import torch
import torch.nn.functional as F

from megatron_longvila.data.vision_transform import scaled_size, to_tower_input
from megatron_longvila.eval.predictor import Video
from megatron_longvila.inference.generator import FrameSettings, Generator
from megatron_longvila.models.config import VisionConfig


def frames_to_tower_input(
    frames: torch.Tensor, vision: VisionConfig, settings: FrameSettings
) -> torch.Tensor:
    """uint8 frames [n, 3, H, W] -> float32 [n, 3, S, S] for the tower (S its image size)."""
    image_size = vision.image_size
    if frames.dtype != torch.uint8 or frames.dim() != 4 or frames.shape[1] != 3:
        raise ValueError(
            f"frames must be uint8 [n, 3, H, W], got {frames.dtype} {tuple(frames.shape)}"
        )
    height, width = frames.shape[2:]
    out_w, out_h = scaled_size(width, height, image_size, settings.resize_mode)
    if (out_h, out_w) != (height, width):
        scaled = F.interpolate(frames.float(), size=(out_h, out_w), mode="bilinear", antialias=True)
        frames = scaled.round_().clamp_(0, 255).to(torch.uint8)
    return to_tower_input(
        list(frames), image_size, settings.resize_mode, vision.image_mean, vision.image_std
    )


class GeneratorPredictor:
    """Answers and option scores from a Generator; every rank of its sp group must make the
    same calls. ``description``: what else the results should record (checkpoint, layout)."""

    def __init__(self, generator: Generator, description: dict[str, Any] | None = None) -> None:
        self.generator = generator
        self.description = dict(description or {})

    def _inputs(self, video: Video | None, num_frames: int | None):
        settings = self.generator.frames
        if num_frames is not None:
            settings = replace(settings, num_frames=num_frames)
        if isinstance(video, torch.Tensor):
            video = frames_to_tower_input(video, self.generator.model.cfg.vision, settings)
        return video, settings

    def answer(
        self,
        question: str,
        video: Video | None,
        *,
        num_frames: int | None = None,
        max_new_tokens: int = 64,
    ) -> str:
        video, settings = self._inputs(video, num_frames)
        return self.generator.generate(
            question, video, frames=settings, max_new_tokens=max_new_tokens
        ).text

    def score_options(
        self,
        question: str,
        options: Sequence[str],
        video: Video | None,
        *,
        num_frames: int | None = None,
    ) -> list[float]:
        video, settings = self._inputs(video, num_frames)
        return self.generator.score_options(question, options, video, frames=settings)

    def describe(self) -> dict[str, Any]:
        generator = self.generator
        return {
            **self.description,
            "chat_template": generator.template.name,
            "system_prompt": generator.system_prompt,
            "frames": asdict(generator.frames),
            "image_size": generator.model.cfg.vision.image_size,
            "decoding": "greedy",
        }
