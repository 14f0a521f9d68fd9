"""The needle-in-a-haystack heatmap: depth (rows) × frames (columns), coloured by accuracy
from red (0%) to green (100%), as in the LongVILA paper's figure."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on a cluster node

import matplotlib.pyplot as plt
import numpy as np


def plot_needle_heatmap(
    accuracy: Sequence[Sequence[float | None]],
    frame_counts: Sequence[int],
    depths: Sequence[float],
    path: str | Path,
    title: str = "Video needle in a haystack",
) -> Path:
    """Save the heatmap PNG at ``path``; ``accuracy[i][j]`` is depth i, frame count j (None:
    not measured, drawn grey). Returns the path."""
    grid = np.array([[np.nan if a is None else a for a in row] for row in accuracy], dtype=float)
    if grid.shape != (len(depths), len(frame_counts)):
        raise ValueError(
            f"accuracy is {grid.shape[0]}×{grid.shape[1]}, expected depths × frames = "
            f"{len(depths)}×{len(frame_counts)}"
        )
    width = min(12.0, 2.0 + 0.6 * len(frame_counts))
    height = min(8.0, 1.5 + 0.45 * len(depths))
    fig, ax = plt.subplots(figsize=(width, height), dpi=80)
    cmap = matplotlib.colormaps["RdYlGn"].with_extremes(bad="lightgrey")
    image = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, vmin=0.0, vmax=1.0, aspect="auto")
    ax.set_xticks(range(len(frame_counts)), [str(n) for n in frame_counts])
    ax.set_yticks(range(len(depths)), [f"{100 * d:g}%" for d in depths])
    ax.set_xlabel("frames")
    ax.set_ylabel("needle depth")
    ax.set_title(title)
    if grid.size <= 200:  # numbers stay readable only on small grids
        for (i, j), value in np.ndenumerate(grid):
            if not np.isnan(value):
                ax.text(j, i, f"{100 * value:.0f}", ha="center", va="center", fontsize=8)
    fig.colorbar(image, ax=ax, label="accuracy")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
