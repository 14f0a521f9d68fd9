"""What an evaluation asks of a model: the :class:`Predictor` protocol.

The harnesses (needle, VideoMME, captioning) talk to a model only through this protocol, so they
run unchanged on a real MM-SP model (:class:`~.generator_predictor.GeneratorPredictor`) or on a
scripted predictor whose right answers are known (the tests).

A video is a file path (the predictor samples ``num_frames`` frames from it itself) or the
frames already chosen, uint8 ``[n, 3, H, W]`` RGB at any size (the predictor resizes them).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import torch

Video = str | Path | torch.Tensor


class Predictor(Protocol):
    def answer(
        self,
        question: str,
        video: Video | None,
        *,
        num_frames: int | None = None,
        max_new_tokens: int = 64,
    ) -> str:
        """The model's greedy answer to ``question`` about ``video``."""
        ...

    def score_options(
        self,
        question: str,
        options: Sequence[str],
        video: Video | None,
        *,
        num_frames: int | None = None,
    ) -> list[float]:
        """One score per option (higher = more likely), e.g. its log-likelihood as the answer."""
        ...

    def describe(self) -> dict[str, Any]:
        """What the results file records about the model: checkpoint, layout, frame settings."""
        ...


def best_option(scores: Sequence[float]) -> int:
    """Index of the highest score (the first one on ties)."""
    if not scores:
        raise ValueError("no option scores")
    return max(range(len(scores)), key=lambda i: (scores[i], -i))
