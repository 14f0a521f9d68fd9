"""MM-SP long-video inference with the LongVILA model: KV cache sharded over sp, 2D prefill.

* :func:`load_model_for_inference` — a model for the current layout from a checkpoint path.
* :class:`Generator` — prompts (video + question) → answers or option scores, on one model.
* :func:`generate_tokens` / :func:`score_continuations` — the same on token ids and frames.
* ``longvila-generate`` (``python -m megatron_longvila.inference.generate``) — the CLI.
"""

from __future__ import annotations

from megatron_longvila.inference.decoding import (
    Generation,
    MultimodalPrompt,
    generate_tokens,
    score_continuations,
)
from megatron_longvila.inference.generator import Answer, FrameSettings, Generator
from megatron_longvila.inference.loading import load_model_for_inference
from megatron_longvila.inference.sampling import SamplingParams

__all__ = [
    "Answer",
    "FrameSettings",
    "Generation",
    "Generator",
    "MultimodalPrompt",
    "SamplingParams",
    "generate_tokens",
    "load_model_for_inference",
    "score_continuations",
]
