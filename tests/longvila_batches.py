"""Multimodal batches for the LongVILA model tests: packed rows of videos with different frame
counts, images and text-only samples, built from seeded random tokens and pixels."""

from __future__ import annotations

import dataclasses

import torch

from megatron_longvila.data.batch import (
    IGNORE_INDEX,
    PAD_SEGMENT,
    MultimodalBatch,
    MultimodalSample,
)
from megatron_longvila.data.packing import collate_rows
from megatron_longvila.data.vision_transform import to_tower_input
from megatron_longvila.models.config import LongVILAConfig

CFG = LongVILAConfig.preset("tiny")  # 42 px frames → 4 visual tokens each; placeholders 248/249
TEXT_VOCAB = 240  # text tokens stay below the placeholder ids
PAD_ID = 0

# Each row is a list of samples, each sample a list of media items (frames per item; one frame is
# an image). Micro-batch 0 packs rows (attention by segment ids) and holds 3 + 1 + 17 = 21 frames
# (6/5/5/5 over four ranks); micro-batch 1 has one sample per row (plain causal attention).
MICRO_BATCHES = (
    ([[3], [1], []], [[17]]),
    ([[5]], [[2, 1]]),
)


def make_sample(
    key: str, gen: torch.Generator, text_len: int, media_frames: list[int], cfg=CFG
) -> MultimodalSample:
    """``text_len`` random text tokens with one placeholder per media item spread among the first
    half (the prompt); the second half is the answer (its labels are its tokens)."""
    ids = torch.randint(0, TEXT_VOCAB, (text_len,), generator=gen)
    labels = torch.full((text_len,), IGNORE_INDEX)
    labels[text_len // 2 :] = ids[text_len // 2 :]
    media, kinds = [], []
    for i, frames in enumerate(media_frames):
        at = 1 + 2 * i
        ids[at] = cfg.video_token_id if frames > 1 else cfg.image_token_id
        labels[at] = IGNORE_INDEX
        size = cfg.vision.image_size
        media.append(torch.randn(frames, cfg.vision.num_channels, size, size, generator=gen))
        kinds.append("video" if frames > 1 else "image")
    return MultimodalSample(key, ids, labels, media, kinds)


def make_batch(rows: list[list[list[int]]], seed: int, cfg=CFG) -> MultimodalBatch:
    gen = torch.Generator().manual_seed(seed)
    samples = [
        [
            make_sample(f"s{seed}-{r}-{i}", gen, int(torch.randint(8, 15, (1,), generator=gen)), m)
            for i, m in enumerate(row)
        ]
        for r, row in enumerate(rows)
    ]
    return collate_rows(samples, PAD_ID)


def micro_batches(cfg=CFG) -> list[MultimodalBatch]:
    return [make_batch(list(rows), seed=10 + i, cfg=cfg) for i, rows in enumerate(MICRO_BATCHES)]


def reference_rows(batch: MultimodalBatch, cfg=CFG) -> list[dict[str, list]]:
    """Each row's multimodal sequence built token by token, independently of the model code.

    Per row: ``tokens`` (``("text", column in the batch row)`` or ``("visual", global visual
    token index)``), ``labels`` (shifted within each sample), ``positions`` (restarting per
    sample), ``segments``. Padding is left out.
    """
    rows, item, visual = [], 0, 0
    for r in range(batch.batch_size):
        tokens, labels, segments = [], [], []
        for t in range(batch.input_ids.shape[1]):
            segment = int(batch.segment_ids[r, t])
            if segment == PAD_SEGMENT:
                continue
            if int(batch.input_ids[r, t]) in (cfg.image_token_id, cfg.video_token_id):
                n = int(batch.media[item].shape[0]) * cfg.tokens_per_frame
                tokens += [("visual", visual + k) for k in range(n)]
                labels += [IGNORE_INDEX] * n
                segments += [segment] * n
                item, visual = item + 1, visual + n
            else:
                tokens.append(("text", t))
                labels.append(int(batch.labels[r, t]))
                segments.append(segment)
        shifted, positions = [], []
        for i, segment in enumerate(segments):
            same_next = i + 1 < len(segments) and segments[i + 1] == segment
            shifted.append(labels[i + 1] if same_next else IGNORE_INDEX)
            positions.append(positions[-1] + 1 if i and segments[i - 1] == segment else 0)
        rows.append(
            {"tokens": tokens, "labels": shifted, "positions": positions, "segments": segments}
        )
    return rows


def uint8_media(batch, seed: int):
    """``batch`` with its media as uint8 pixels as the loader delivers them (pad mode: tall,
    wide and square items), and the same batch with those pixels normalized on the CPU first."""
    gen = torch.Generator().manual_seed(seed)
    size, v = CFG.vision.image_size, CFG.vision
    shapes = [(size, 28), (30, size), (size, size)]
    pixels = [
        torch.randint(0, 256, (len(m), 3, *shapes[i % 3]), generator=gen, dtype=torch.uint8)
        for i, m in enumerate(batch.media)
    ]
    normalized = [to_tower_input(p, size, "pad", v.image_mean, v.image_std) for p in pixels]
    return dataclasses.replace(batch, media=pixels), dataclasses.replace(batch, media=normalized)
