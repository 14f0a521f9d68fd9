"""Rows of samples: choosing which samples share a row, and padding rows into a batch."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from megatron_longvila.data.batch import (
    IGNORE_INDEX,
    PAD_SEGMENT,
    MultimodalBatch,
    MultimodalSample,
)


def pack_first_fit(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Group indices so each group's total length is <= capacity: first-fit decreasing
    (ties keep their order). Every index lands in exactly one group."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    groups: list[list[int]] = []
    room: list[int] = []
    for i in order:
        for g, free in enumerate(room):
            if lengths[i] <= free:
                groups[g].append(i)
                room[g] -= lengths[i]
                break
        else:
            groups.append([i])
            room.append(capacity - lengths[i])
    return [sorted(g) for g in groups]


def collate_rows(rows: Sequence[Sequence[MultimodalSample]], pad_id: int) -> MultimodalBatch:
    """Concatenate each row's samples, pad rows to the longest -> MultimodalBatch."""
    length = max(sum(int(s.input_ids.numel()) for s in row) for row in rows)
    input_ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)
    segment_ids = torch.full((len(rows), length), PAD_SEGMENT, dtype=torch.long)
    media, keys = [], []
    for r, row in enumerate(rows):
        start = 0
        for segment, sample in enumerate(row):
            end = start + int(sample.input_ids.numel())
            input_ids[r, start:end] = sample.input_ids
            labels[r, start:end] = sample.labels
            segment_ids[r, start:end] = segment
            media.extend(sample.media)
            start = end
        keys.append([s.key for s in row])
    return MultimodalBatch(
        input_ids=input_ids, labels=labels, segment_ids=segment_ids, media=media, keys=keys
    )
