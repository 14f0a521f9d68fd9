"""The mlp_downsample projector: 2×2 merge order, odd-grid padding, weights in VILA's layout.

Reference: a loop-by-loop merge written here from the documented convention (top-left,
top-right, bottom-left, bottom-right; zero patches beyond the right/bottom edge; merged tokens
row-major, or column-major for 2024 VILA checkpoints), followed by VILA's layer sequence
(``layers.1`` LayerNorm, ``layers.2`` Linear, GELU, ``layers.4`` Linear) built from torch
modules here. Tolerance: the merge is exact; the projector output 1e-6 absolute (fp32).
"""

from __future__ import annotations

import math

import pytest
import torch

from megatron_longvila.convert.hf_mapping import (
    ConversionError,
    projector_state_from_hf,
    projector_state_to_hf,
)
from megatron_longvila.models.config import LongVILAConfig, ProjectorConfig
from megatron_longvila.models.projector import MLPDownsampleProjector, merge_2x2


def reference_merge(features: torch.Tensor, token_order: str) -> torch.Tensor:
    n, patches, c = features.shape
    g = math.isqrt(patches)
    m = (g + 1) // 2

    def patch(frame: int, r: int, col: int) -> torch.Tensor:
        inside = r < g and col < g
        return features[frame, r * g + col] if inside else torch.zeros(c)

    frames = []
    for f in range(n):
        cells = [(i, j) for i in range(m) for j in range(m)]
        if token_order == "column_major":
            cells = [(i, j) for j in range(m) for i in range(m)]
        tokens = [
            torch.cat(
                [
                    patch(f, 2 * i, 2 * j),
                    patch(f, 2 * i, 2 * j + 1),
                    patch(f, 2 * i + 1, 2 * j),
                    patch(f, 2 * i + 1, 2 * j + 1),
                ]
            )
            for i, j in cells
        ]
        frames.append(torch.stack(tokens))
    return torch.stack(frames)


@pytest.mark.parametrize("grid", [2, 3, 4, 5])
@pytest.mark.parametrize("token_order", ["row_major", "column_major"])
def test_merge_order_and_padding_match_the_reference(grid, token_order):
    features = torch.randn(2, grid * grid, 3)
    merged = merge_2x2(features, token_order)
    assert merged.shape == (2, ((grid + 1) // 2) ** 2, 12)
    assert torch.equal(merged, reference_merge(features, token_order))


def test_merge_of_a_labelled_grid():
    # 3×3 patches labelled by position (1..9); 0 marks the padding.
    features = torch.arange(1.0, 10.0).reshape(1, 9, 1)
    assert merge_2x2(features).squeeze(0).tolist() == [
        [1, 2, 4, 5],
        [3, 0, 6, 0],
        [7, 8, 0, 0],
        [9, 0, 0, 0],
    ]
    assert merge_2x2(features, "column_major").squeeze(0)[1].tolist() == [7, 8, 0, 0]


def test_non_square_grids_are_refused():
    with pytest.raises(ValueError, match="square patch grid, got 10 patches"):
        merge_2x2(torch.zeros(1, 10, 4))


def _vila_projector(vision_hidden: int, llm_hidden: int) -> torch.nn.Sequential:
    layers = torch.nn.Sequential(
        torch.nn.Identity(),  # VILA's DownSampleBlock sits here; it has no weights
        torch.nn.LayerNorm(4 * vision_hidden),
        torch.nn.Linear(4 * vision_hidden, llm_hidden),
        torch.nn.GELU(),
        torch.nn.Linear(llm_hidden, llm_hidden),
    )
    with torch.no_grad():
        for p in layers.parameters():
            p.normal_(0.0, 0.5)
    return layers


@pytest.mark.parametrize("token_order", ["row_major", "column_major"])
def test_projector_equals_vila_layers_on_reference_merge(token_order):
    torch.manual_seed(0)
    vila = _vila_projector(8, 16)
    hf_state = {f"layers.{k}": v for k, v in vila.state_dict().items()}
    ours = MLPDownsampleProjector(ProjectorConfig(token_order=token_order), 8, 16)
    ours.load_state_dict(projector_state_from_hf(hf_state, 8, 16))
    features = torch.randn(3, 25, 8)  # 5×5 grid: padded to 6×6, 9 tokens per frame
    got = ours(features)
    assert got.shape == (3, 9, 16)
    ref = vila(reference_merge(features, token_order))
    assert (got - ref).abs().max().item() <= 1e-6
    back = projector_state_to_hf(ours.state_dict(), 8, 16)
    assert back.keys() == hf_state.keys()
    assert all(torch.equal(back[k], hf_state[k]) for k in hf_state)


def test_conversion_error_names_tensor_and_shapes():
    hf_state = {f"layers.{k}": v for k, v in _vila_projector(8, 16).state_dict().items()}
    with pytest.raises(ConversionError, match=r"'layers\.2\.weight' has shape \(16, 32\), exp"):
        projector_state_from_hf(hf_state, 8, 32)


def test_tokens_per_frame():
    assert LongVILAConfig.preset("longvila-qwen2-7b").tokens_per_frame == 196  # 27² → 14²
    assert LongVILAConfig.preset("tiny").tokens_per_frame == 4  # 3² → 2²
