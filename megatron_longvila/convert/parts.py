"""The whole model's tensors ↔ the three Hugging Face parts, by module name (TP=1).

``llm.*``, ``vision_tower.*`` and ``mm_projector.*`` of a :class:`LongVILAModel` state dict go
through ``hf_mapping`` (LLM: transformers Qwen2/Llama names; vision tower: SiglipVisionModel
names; projector: VILA's ``mm_projector`` names) and back. Every tensor is accounted for: a
missing, unexpected or misshapen one raises ``ConversionError`` naming it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

from megatron_longvila.convert.hf_mapping import (
    ConversionError,
    llm_state_from_hf,
    llm_state_to_hf,
    projector_state_from_hf,
    projector_state_to_hf,
    vision_state_from_hf,
    vision_state_to_hf,
)
from megatron_longvila.models.config import MODULES, LongVILAConfig

Tensors = Mapping[str, torch.Tensor]


def _converters(cfg: LongVILAConfig) -> dict[str, tuple[Callable, Callable]]:
    """Part → (ours → HF, HF → ours)."""
    h_vision, h_llm = cfg.vision.hidden_size, cfg.llm.hidden_size
    return {
        "llm": (lambda t: llm_state_to_hf(t, cfg.llm), lambda t: llm_state_from_hf(t, cfg.llm)),
        "vision_tower": (
            lambda t: vision_state_to_hf(t, cfg.vision),
            lambda t: vision_state_from_hf(t, cfg.vision),
        ),
        "mm_projector": (
            lambda t: projector_state_to_hf(t, h_vision, h_llm),
            lambda t: projector_state_from_hf(t, h_vision, h_llm),
        ),
    }


def split_by_part(state: Tensors) -> dict[str, dict[str, torch.Tensor]]:
    """``{"llm": {name without "llm.": tensor}, ...}``; a tensor of no part is an error."""
    parts: dict[str, dict[str, torch.Tensor]] = {part: {} for part in MODULES}
    for name, tensor in state.items():
        part, _, rest = name.partition(".")
        if part not in parts:
            raise ConversionError(f"tensor {name!r} belongs to none of the parts {MODULES}")
        parts[part][rest] = tensor
    return parts


def hf_parts_from_state(state: Tensors, cfg: LongVILAConfig) -> dict[str, dict[str, torch.Tensor]]:
    """Our full state dict (module names) → HF tensors of each part."""
    ours = split_by_part(state)
    return {part: to_hf(ours[part]) for part, (to_hf, _) in _converters(cfg).items()}


def state_from_hf_parts(
    parts: Mapping[str, Tensors], cfg: LongVILAConfig
) -> dict[str, torch.Tensor]:
    """HF tensors of each part → our full state dict (module names)."""
    out = {}
    for part, (_, from_hf) in _converters(cfg).items():
        out |= {f"{part}.{name}": t for name, t in from_hf(parts[part]).items()}
    return out
