"""Rotary position embeddings computed from explicit per-token position ids.

Positions restart at 0 in every packed sample, and under MM-SP each rank holds a zigzag shard
whose global positions travel with its tokens; so the rotation of a token is computed from its
own position id, never from its index in the local tensor. The result is fed to megatron-core's
attention as ``rotary_pos_emb``; its non-interleaved ``rotate_half`` rotation (the first half
of a head pairs with the second half) is the one transformers' Llama/Qwen2 use.
"""

from __future__ import annotations

import math

import torch

from megatron_longvila.models.config import RopeScaling


def rope_inverse_frequencies(
    head_dim: int, theta: float, scaling: RopeScaling | None = None
) -> torch.Tensor:
    """Angular frequency of each rotated pair: ``[head_dim / 2]`` fp32.

    ``theta ** (-2i / head_dim)``, then scaled as ``scaling`` says (see :class:`RopeScaling`).
    """
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    inv_freq = 1.0 / (theta**exponents)
    if scaling is None:
        return inv_freq
    if scaling.kind == "linear":
        return inv_freq / scaling.factor
    return _llama3_scaled(inv_freq, scaling)


def _llama3_scaled(inv_freq: torch.Tensor, s: RopeScaling) -> torch.Tensor:
    """Llama 3.1's rule: slow rotations are interpolated, fast ones kept, a ramp in between."""
    wavelength = 2 * math.pi / inv_freq
    long_wavelength = s.original_max_position_embeddings / s.low_freq_factor
    short_wavelength = s.original_max_position_embeddings / s.high_freq_factor
    # 0 at the long-wavelength end of the ramp, 1 at the short one.
    ramp = (s.original_max_position_embeddings / wavelength - s.low_freq_factor) / (
        s.high_freq_factor - s.low_freq_factor
    )
    blended = (1 - ramp) * inv_freq / s.factor + ramp * inv_freq
    scaled = torch.where(wavelength > long_wavelength, inv_freq / s.factor, inv_freq)
    in_ramp = (wavelength >= short_wavelength) & (wavelength <= long_wavelength)
    return torch.where(in_ramp, blended, scaled)


def rotary_angles(position_ids: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Rotation angles of every token in megatron's layout.

    position_ids: [b, s] integer positions (any order, restarting per sample).
    inv_freq:     [d/2] from :func:`rope_inverse_frequencies`.
    Returns       [s, b, 1, d] fp32: ``angle[s, b, 0, i] = position[b, s] * inv_freq[i mod d/2]``,
    which megatron-core's ``apply_rotary_pos_emb`` broadcasts over the heads of q/k
    ``[s, b, heads, d]`` element by element.
    """
    if position_ids.dim() != 2:
        raise ValueError(f"position_ids must be [b, s], got shape {tuple(position_ids.shape)}")
    angles = position_ids.to(torch.float32).unsqueeze(-1) * inv_freq.to(position_ids.device)
    angles = torch.cat((angles, angles), dim=-1)  # [b, s, d]: both halves share a frequency
    return angles.transpose(0, 1).unsqueeze(2).contiguous()
