"""What the data pipeline hands to the model: one sample, and a batch of them.

Text carries one placeholder token per media item (``<image>`` or ``<video>``); the model expands
each placeholder into ``frames × tokens_per_frame`` visual embeddings. ``labels`` are aligned
with ``input_ids`` (not shifted): the model expands and shifts them itself, so that shifting
happens on the full multimodal sequence before it is split for sequence parallelism.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

IGNORE_INDEX = -100
"""Label of every token that carries no loss (prompt, system text, padding, visual tokens)."""

PAD_SEGMENT = -1
"""Segment id of padding positions in a packed or padded row."""


@dataclass
class MultimodalSample:
    """One conversation after tokenization.

    input_ids: [s] int64, one placeholder token per media item.
    labels:    [s] int64, the token where the assistant speaks, ``IGNORE_INDEX`` elsewhere.
    media:     one tensor per placeholder, in text order (an image is one frame): uint8 pixels
               ``[frames, 3, h, w]`` with h, w <= the tower's size S, which the model centres on
               a square of the mean colour and normalizes on its device (what the loader
               gives), or float ``[frames, 3, S, S]`` already normalized.
    """

    key: str
    input_ids: torch.Tensor
    labels: torch.Tensor
    media: list[torch.Tensor] = field(default_factory=list)
    media_kinds: list[str] = field(default_factory=list)  # "image" | "video", per placeholder

    def __post_init__(self) -> None:
        if self.input_ids.shape != self.labels.shape or self.input_ids.dim() != 1:
            raise ValueError(
                f"sample {self.key}: input_ids {tuple(self.input_ids.shape)} and labels "
                f"{tuple(self.labels.shape)} must be equal 1-D shapes"
            )
        if len(self.media) != len(self.media_kinds):
            raise ValueError(
                f"sample {self.key}: {len(self.media)} media tensors but "
                f"{len(self.media_kinds)} media kinds"
            )

    @property
    def num_frames(self) -> int:
        return sum(int(m.shape[0]) for m in self.media)


@dataclass
class MultimodalBatch:
    """Rows of one or more packed samples, padded to a common text length.

    input_ids:   [b, s] int64, padded with the tokenizer's pad id.
    labels:      [b, s] int64, ``IGNORE_INDEX`` at padding.
    segment_ids: [b, s] int64, which packed sample of the row a token belongs to (0, 1, ...),
                 ``PAD_SEGMENT`` at padding. Tokens attend only within their segment; positions
                 restart at 0 in each segment.
    media:       every media tensor of the batch, row by row, in text order within a row.
    keys:        the sample keys of each row, in packing order.
    """

    input_ids: torch.Tensor
    labels: torch.Tensor
    segment_ids: torch.Tensor
    media: list[torch.Tensor]
    keys: list[list[str]]

    @property
    def batch_size(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def num_frames(self) -> int:
        return sum(int(m.shape[0]) for m in self.media)
