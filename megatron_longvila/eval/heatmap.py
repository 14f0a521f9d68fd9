"""The needle-in-a-haystack heatmap: depth (rows) × frames (columns), coloured by accuracy
from red (0%) to green (100%), as in the LongVILA paper's figure; below it, when given, the
accuracy per length as bars against the chance level."""

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
    by_frames: Sequence[float | None] | None = None,
    chance: float | None = None,
) -> Path:
    """Save the heatmap PNG at ``path``; ``accuracy[i][j]`` is depth i, frame count j (None:
    not measured, drawn grey). ``by_frames[j]`` (accuracy over all depths of frame count j)
    adds a bar panel; ``chance`` is marked on the colour bar and the bars. Returns the path."""
    grid = np.array([[np.nan if a is None else a for a in row] for row in accuracy], dtype=float)
    if grid.shape != (len(depths), len(frame_counts)):
        raise ValueError(
            f"accuracy is {grid.shape[0]}×{grid.shape[1]}, expected depths × frames = "
            f"{len(depths)}×{len(frame_counts)}"
        )
    if by_frames is not None and len(by_frames) != len(frame_counts):
        raise ValueError(f"{len(by_frames)} per-length accuracies for {len(frame_counts)} lengths")
    width = min(12.0, 2.0 + 0.6 * len(frame_counts))
    height = min(8.0, 1.5 + 0.45 * len(depths))
    if by_frames is None:
        fig, ax = plt.subplots(figsize=(width, height), dpi=80)
    else:
        fig, (ax, bars) = plt.subplots(
            2, 1, figsize=(width, height + 1.6), dpi=80, height_ratios=(height - 1.0, 1.6)
        )
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
    colorbar = fig.colorbar(image, ax=ax, label="accuracy")
    if chance is not None:
        colorbar.ax.axhline(chance, color="black", linewidth=1.5)
        colorbar.ax.text(1.6, chance, "chance", transform=colorbar.ax.get_yaxis_transform())
    if by_frames is not None:
        _plot_by_frames(bars, by_frames, frame_counts, chance)
        fig.colorbar(image, ax=bars).ax.set_visible(False)  # keeps the two panels aligned
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def _plot_by_frames(
    ax, by_frames: Sequence[float | None], frame_counts: Sequence[int], chance: float | None
) -> None:
    values = [np.nan if a is None else 100 * a for a in by_frames]
    ax.bar(range(len(frame_counts)), values, color="tab:green", width=0.6)
    for j, value in enumerate(values):
        if not np.isnan(value):
            ax.text(j, value + 2, f"{value:.0f}%", ha="center", va="bottom", fontsize=8)
    if chance is not None:
        ax.axhline(100 * chance, color="black", linestyle="--", linewidth=1)
        ax.text(
            1.02,
            100 * chance,
            f"chance\n{100 * chance:.0f}%",
            transform=ax.get_yaxis_transform(),
            va="center",
            fontsize=8,
        )
    ax.set_xticks(range(len(frame_counts)), [str(n) for n in frame_counts])
    ax.set_xlim(-0.5, len(frame_counts) - 0.5)
    ax.set_ylim(0, 115)
    ax.set_ylabel("accuracy %")
    ax.set_xlabel("frames (all depths)")
