"""The ``mlp_downsample`` projector: vision features → LLM embeddings, 4× fewer tokens per frame.

Each 2×2 neighbourhood of patch features is concatenated into one token (a grid with an odd side
is first padded with zero features on the right and at the bottom), then LayerNorm → Linear →
GELU → Linear maps it to the LLM width. This is VILA's ``mlp_downsample``; its weights load
unchanged (see ``hf_mapping``).

Order, for a patch grid ``x[r, c]`` (patches row-major, as the vision tower emits them):

* the merged token at ``(i, j)`` is ``cat(x[2i, 2j], x[2i, 2j+1], x[2i+1, 2j], x[2i+1, 2j+1])``
  (top-left, top-right, bottom-left, bottom-right);
* merged tokens follow in row-major order of ``(i, j)``, or column-major with
  ``ProjectorConfig.token_order = "column_major"`` (VILA's 2024 code, before it transposed
  the merged grid back).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from megatron_longvila.models.config import ProjectorConfig


def merge_2x2(features: torch.Tensor, token_order: str = "row_major") -> torch.Tensor:
    """Concatenate 2×2 patch neighbourhoods.

    features: [n, g*g, c] patch features of square grids, row-major.
    Returns   [n, ceil(g/2)**2, 4c], ordered as the module docstring says.
    """
    n, patches, c = features.shape
    g = math.isqrt(patches)
    if g * g != patches:
        raise ValueError(f"merge_2x2 needs a square patch grid, got {patches} patches per frame")
    grid = features.reshape(n, g, g, c)
    if g % 2:
        # F.pad pads the last dims first: (channels), (columns: right), (rows: bottom).
        grid = F.pad(grid, (0, 0, 0, 1, 0, 1))
    m = grid.shape[1] // 2
    # [n, i, dr, j, dc, c] -> [n, i, j, dr, dc, c]: dr/dc = 0/1 within the neighbourhood.
    blocks = grid.reshape(n, m, 2, m, 2, c).permute(0, 1, 3, 2, 4, 5)
    if token_order == "column_major":
        blocks = blocks.transpose(1, 2)
    elif token_order != "row_major":
        raise ValueError(f"token_order must be 'row_major' or 'column_major', got {token_order!r}")
    return blocks.reshape(n, m * m, 4 * c)


class MLPDownsampleProjector(torch.nn.Module):
    """``forward(features [n, g*g, vision_hidden]) -> [n, ceil(g/2)**2, llm_hidden]``.

    Replicated on every tensor-parallel rank (it is small); parameters ``norm`` (LayerNorm of
    4·vision_hidden), ``fc1`` and ``fc2`` (Linear with bias).
    """

    def __init__(
        self,
        cfg: ProjectorConfig,
        vision_hidden_size: int,
        llm_hidden_size: int,
        *,
        params_dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        self.cfg = cfg
        merged = 4 * vision_hidden_size
        self.norm = torch.nn.LayerNorm(merged, eps=cfg.layer_norm_eps, dtype=params_dtype)
        self.fc1 = torch.nn.Linear(merged, llm_hidden_size, dtype=params_dtype)
        self.fc2 = torch.nn.Linear(llm_hidden_size, llm_hidden_size, dtype=params_dtype)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = merge_2x2(features, self.cfg.token_order)
        # Exact (erf) GELU, as VILA's nn.GELU(); the vision tower's is the tanh one.
        return self.fc2(F.gelu(self.fc1(self.norm(x))))
