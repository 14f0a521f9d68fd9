"""What one sp rank feeds the LongVILA model, built from a :class:`MultimodalBatch` alone.

A pure function of the batch, the config and the layout (no vision compute), so every rank of an
sp group and every pipeline stage builds its own inputs from the same batch:

1. **Expand.** Each placeholder token becomes ``frames × T`` visual positions (``T`` =
   ``tokens_per_frame``), frame-major. Text padding is dropped and rows are padded again to one
   length ``S``, a multiple of ``2·sp`` (of ``2·sp·tp`` under TP sequence parallelism; padding:
   id 0, segment ``PAD_SEGMENT``, position 0).
2. **Shift.** On the expanded sequence, ``labels[t]`` is the label of token ``t+1`` of the same
   sample: ``IGNORE_INDEX`` where that token is visual, at each sample's last token and at
   padding. Shifting before the split means no rank needs its neighbour's first token.
3. **Positions** restart at 0 in every packed sample (they count visual tokens too).
4. **Stage 2 split**: zigzag (rank ``r`` keeps chunks ``r`` and ``2·sp−1−r``) of ids, labels,
   positions and segment ids.
5. **Stage 1 share**: the frames this rank encodes (:func:`frame_range`), normalized on the
   model's device when they come as uint8 pixels, and the route of the visual tokens to the
   ranks holding their positions (:class:`VisualTokenRoute`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_longvila.core.sequence_parallel.sharding import locate_tokens, shard_token_indices
from megatron_longvila.core.sequence_parallel.visual_exchange import VisualTokenRoute, frame_range
from megatron_longvila.core.topology import sequence_multiple
from megatron_longvila.data.batch import IGNORE_INDEX, PAD_SEGMENT, MultimodalBatch
from megatron_longvila.data.vision_transform import to_tower_input
from megatron_longvila.models.config import LongVILAConfig, VisionConfig


@dataclass
class ExpandedBatch:
    """The whole multimodal sequence of a batch, before the split.

    input_ids, labels (shifted), position_ids, segment_ids: [b, S] int64; visual positions hold
    their placeholder's id (the embedding there is replaced by a visual token).
    visual_positions: [V] flat positions ``row · S + t`` of the visual tokens, in frame order
    (media items in batch order, frames in order, ``T`` tokens per frame).
    """

    input_ids: torch.Tensor
    labels: torch.Tensor
    position_ids: torch.Tensor
    segment_ids: torch.Tensor
    visual_positions: torch.Tensor

    @property
    def seq_length(self) -> int:
        return int(self.input_ids.shape[1])


@dataclass
class MMSPInputs:
    """One rank's share of a micro-batch.

    input_ids, labels, position_ids, segment_ids: [b, S/sp], this rank's zigzag shard.
    seq_length: the global padded length ``S``.
    packed: some row of the batch holds several samples, so attention needs the segment ids.
    Otherwise causal attention alone is exact: padding only trails a row's tokens, so no token
    sees it, and it carries no loss.
    frames: [n, C, H, W] the frames this rank encodes (None on stages without the vision tower).
    route: where this rank's visual tokens go and where received ones belong.
    """

    input_ids: torch.Tensor
    labels: torch.Tensor
    position_ids: torch.Tensor
    segment_ids: torch.Tensor
    seq_length: int
    packed: bool
    route: VisualTokenRoute
    frames: torch.Tensor | None

    def to(self, device: torch.device | str) -> MMSPInputs:
        return MMSPInputs(
            input_ids=self.input_ids.to(device),
            labels=self.labels.to(device),
            position_ids=self.position_ids.to(device),
            segment_ids=self.segment_ids.to(device),
            seq_length=self.seq_length,
            packed=self.packed,
            route=self.route.to(device),
            frames=None if self.frames is None else self.frames.to(device),
        )


def placeholder_mask(batch: MultimodalBatch, cfg: LongVILAConfig) -> torch.Tensor:
    """Where the batch's ``<image>``/``<video>`` placeholders are: [b, s] bool (padding left out).

    Refuses a batch whose placeholders and media disagree: one placeholder per media item, and
    every media item ``[frames ≥ 1, C, H, W]`` at the vision tower's size S (float, normalized)
    or uint8 pixels ``[frames ≥ 1, C, h, w]`` with h, w ≤ S (see :func:`tower_pixels`).
    """
    ids = batch.input_ids
    placeholders = (ids == cfg.image_token_id) | (ids == cfg.video_token_id)
    placeholders &= batch.segment_ids != PAD_SEGMENT
    found = int(placeholders.sum())
    if found != len(batch.media):
        raise ValueError(
            f"the batch has {found} <image>/<video> placeholder tokens (ids "
            f"{cfg.image_token_id}/{cfg.video_token_id}) but {len(batch.media)} media items; "
            "each media item needs exactly one placeholder"
        )
    v = cfg.vision
    c, size = v.num_channels, v.image_size
    for i, media in enumerate(batch.media):
        shape = tuple(media.shape)
        fits = len(shape) == 4 and shape[0] >= 1 and shape[1] == c
        if media.dtype == torch.uint8:
            fits = fits and max(shape[2:]) <= size
        else:
            fits = fits and media.is_floating_point() and shape[2:] == (size, size)
        if not fits:
            raise ValueError(
                f"media item {i} is {media.dtype} {shape}; the vision tower takes float frames "
                f"[frames >= 1, {c}, {size}, {size}] or uint8 pixels [frames >= 1, {c}, h, w] "
                f"with h, w <= {size}"
            )
    return placeholders


def _positions_in_segments(segment_ids: torch.Tensor) -> torch.Tensor:
    """[L] positions counting from 0 at the start of each run of equal segment ids."""
    index = torch.arange(segment_ids.numel())
    starts = torch.ones_like(segment_ids, dtype=torch.bool)
    starts[1:] = segment_ids[1:] != segment_ids[:-1]
    return index - (index * starts).cummax(0).values


def _shifted_labels(labels: torch.Tensor, segment_ids: torch.Tensor) -> torch.Tensor:
    """[L] ``labels[t+1]`` where tokens ``t`` and ``t+1`` share a sample, else IGNORE_INDEX."""
    shifted = torch.full_like(labels, IGNORE_INDEX)
    same = segment_ids[1:] == segment_ids[:-1]
    shifted[:-1] = torch.where(same, labels[1:], IGNORE_INDEX)
    return shifted


def expand_batch(batch: MultimodalBatch, cfg: LongVILAConfig, multiple: int = 1) -> ExpandedBatch:
    """The expanded, shifted, position-numbered batch, padded to a multiple of ``multiple``."""
    placeholders = placeholder_mask(batch, cfg)
    tokens_per_frame = cfg.tokens_per_frame
    span = torch.ones_like(batch.input_ids)
    frames = torch.tensor([int(m.shape[0]) for m in batch.media], dtype=torch.long)
    span[placeholders] = frames * tokens_per_frame  # boolean indexing is row-major: media order
    rows = []
    for r in range(batch.batch_size):
        keep = batch.segment_ids[r] != PAD_SEGMENT
        row_span = span[r][keep]
        length = int(row_span.sum())
        if length > cfg.seq_length_limit:
            row_media = int(placeholders[r].sum())
            row_frames = int((row_span[placeholders[r][keep]] // tokens_per_frame).sum())
            raise ValueError(
                f"row {r} is {length} tokens long after expanding its {row_media} media items "
                f"({row_frames} frames × {tokens_per_frame} tokens per frame), more than "
                f"max_seq_length {cfg.seq_length_limit}"
            )
        segments = batch.segment_ids[r][keep].repeat_interleave(row_span)
        visual = placeholders[r][keep].repeat_interleave(row_span)
        labels = batch.labels[r][keep].repeat_interleave(row_span).masked_fill(visual, IGNORE_INDEX)
        rows.append(
            {
                "input_ids": batch.input_ids[r][keep].repeat_interleave(row_span),
                "labels": _shifted_labels(labels, segments),
                "position_ids": _positions_in_segments(segments),
                "segment_ids": segments,
                "visual": visual.nonzero().flatten(),
            }
        )
    longest = max((row["segment_ids"].numel() for row in rows), default=0)
    seq_length = max(multiple, -(-longest // multiple) * multiple)
    fill = {"input_ids": 0, "labels": IGNORE_INDEX, "position_ids": 0, "segment_ids": PAD_SEGMENT}
    out = {
        name: torch.full((batch.batch_size, seq_length), value, dtype=torch.long)
        for name, value in fill.items()
    }
    for r, row in enumerate(rows):
        for name in fill:
            out[name][r, : row[name].numel()] = row[name]
    visual_positions = torch.cat(
        [row["visual"] + r * seq_length for r, row in enumerate(rows)]
        or [torch.zeros(0, dtype=torch.long)]
    )
    return ExpandedBatch(visual_positions=visual_positions, **out)


def tower_pixels(
    frames: torch.Tensor, vision: VisionConfig | None, device: torch.device | str | None = None
) -> torch.Tensor:
    """Frames of one media item as the tower's input on ``device`` (default: where they are):
    float [n, C, S, S] is taken as normalized; uint8 [n, C, h, w] (h, w ≤ S) is moved as uint8,
    then centred on a square of the mean colour and normalized with ``vision``'s mean and std
    there (:func:`~megatron_longvila.data.vision_transform.to_tower_input`)."""
    frames = frames.to(device, non_blocking=True) if device is not None else frames
    if frames.dtype != torch.uint8:
        return frames
    if vision is None:
        raise ValueError("uint8 frames need the vision config to be normalized")
    return to_tower_input(frames, vision.image_size, "pad", vision.image_mean, vision.image_std)


def select_frames(
    media: list[torch.Tensor],
    start: int,
    stop: int,
    vision: VisionConfig | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor | None:
    """Frames ``[start, stop)`` of the batch (media items in order, frames in order) as one
    tower input [stop − start, C, S, S] on ``device`` (see :func:`tower_pixels`; ``vision`` is
    needed for uint8 media); None when there are none. Only the selected frames are moved and
    normalized."""
    parts, offset = [], 0
    for item in media:
        n = int(item.shape[0])
        lo, hi = max(start - offset, 0), min(stop - offset, n)
        if lo < hi:
            parts.append(tower_pixels(item[lo:hi], vision, device))
        offset += n
    return torch.cat(parts) if parts else None


def prepare_mmsp_inputs(
    batch: MultimodalBatch,
    cfg: LongVILAConfig,
    sp: int = 1,
    sp_rank: int = 0,
    with_frames: bool = True,
    tp_sequence_split: int = 1,
    device: torch.device | str | None = None,
) -> MMSPInputs:
    """Rank ``sp_rank``'s inputs for ``batch`` split over ``sp`` ranks (see the module docstring).

    ``with_frames=False`` leaves the pixels out (pipeline stages after the first); otherwise
    this rank's frames become the tower's input on ``device`` (:func:`select_frames`).
    ``tp_sequence_split``: the tensor-parallel size under Megatron's TP sequence parallelism (each
    shard is split again over tp, so ``S`` is a multiple of ``2·sp·tp``), else 1.
    """
    full = expand_batch(batch, cfg, multiple=sequence_multiple(sp, tp_sequence_split))
    seq_length, b = full.seq_length, batch.batch_size
    index = shard_token_indices(seq_length, sp, sp_rank)
    rows, positions = full.visual_positions // seq_length, full.visual_positions % seq_length
    owner, local = locate_tokens(positions, seq_length, sp)
    route = VisualTokenRoute.build(owner, local * b + rows, cfg.tokens_per_frame, sp, sp_rank)
    frames = None
    if with_frames:
        start, stop = frame_range(batch.num_frames, sp, sp_rank)
        frames = select_frames(batch.media, start, stop, cfg.vision, device)
    segments = full.segment_ids
    packed = bool(((segments != segments[:, :1]) & (segments != PAD_SEGMENT)).any())
    return MMSPInputs(
        input_ids=full.input_ids[:, index],
        labels=full.labels[:, index],
        position_ids=full.position_ids[:, index],
        segment_ids=segments[:, index],
        seq_length=seq_length,
        packed=packed,
        route=route,
        frames=frames,
    )
