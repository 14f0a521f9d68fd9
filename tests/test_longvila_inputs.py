"""Inputs of the LongVILA model: stage-1 frame shares, the expanded sequence, zigzag shards, the
visual-token route, and clear errors for bad batches (one process, no model).

References: a token-by-token Python construction of each row (``reference_rows``: placeholders
expanded, labels shifted within samples, positions restarting per sample); megatron-core's zigzag
split (``shard_token_indices`` / ``split_zigzag``, checked against mcore in test_mmsp_sharding);
the media tensors themselves for the frames each rank gets. All comparisons are exact.
"""

from __future__ import annotations

import random

import pytest
import torch
from longvila_batches import CFG, make_batch, micro_batches, reference_rows, uint8_media

from megatron_longvila.core.sequence_parallel.sharding import shard_token_indices, split_zigzag
from megatron_longvila.core.sequence_parallel.visual_exchange import frame_range, frames_per_rank
from megatron_longvila.data.batch import IGNORE_INDEX, PAD_SEGMENT
from megatron_longvila.models.config import LongVILAConfig
from megatron_longvila.models.multimodal_inputs import expand_batch, prepare_mmsp_inputs


def _random_rows(rng: random.Random) -> list[list[list[int]]]:
    """1–3 rows of 1–3 samples, each with 0–2 media items of 1–12 frames."""
    return [
        [[rng.randint(1, 12) for _ in range(rng.randint(0, 2))] for _ in range(rng.randint(1, 3))]
        for _ in range(rng.randint(1, 3))
    ]


def test_frame_shares_differ_by_at_most_one_for_any_batch():
    rng = random.Random(0)
    for _ in range(300):
        counts = [rng.randint(1, 64) for _ in range(rng.randint(0, 12))]
        sp = rng.randint(1, 16)
        shares = frames_per_rank(sum(counts), sp)
        assert sum(shares) == sum(counts) and max(shares) - min(shares) <= 1, (counts, sp)
        ranges = [frame_range(sum(counts), sp, r) for r in range(sp)]
        assert [b - a for a, b in ranges] == shares
        assert all(ranges[r][1] == ranges[r + 1][0] for r in range(sp - 1))  # contiguous runs
    # The same through the model inputs, on real batches: every frame once, shares balanced.
    for seed in range(12):
        batch = make_batch(_random_rows(rng), seed=seed)
        sp = rng.choice([1, 2, 3, 4, 8])
        frames = [prepare_mmsp_inputs(batch, CFG, sp, r).frames for r in range(sp)]
        sizes = [0 if f is None else len(f) for f in frames]
        assert max(sizes) - min(sizes) <= 1, sizes
        present = [f for f in frames if f is not None]
        if batch.media:
            assert torch.equal(torch.cat(present), torch.cat(batch.media))
        else:
            assert not present


def test_uneven_samples_3_17_1_frames_over_4_ranks():
    batch = make_batch([[[3], [17]], [[1]]], seed=3)
    frames = [prepare_mmsp_inputs(batch, CFG, 4, r).frames for r in range(4)]
    assert [len(f) for f in frames] == [6, 5, 5, 5]
    three, seventeen, one = batch.media
    assert torch.equal(frames[0], torch.cat([three, seventeen[:3]]))
    assert torch.equal(frames[1], seventeen[3:8])
    assert torch.equal(frames[2], seventeen[8:13])
    assert torch.equal(frames[3], torch.cat([seventeen[13:], one]))
    # Pipeline stages after the first carry no pixels.
    assert prepare_mmsp_inputs(batch, CFG, 4, 0, with_frames=False).frames is None


@pytest.mark.parametrize("batch_index", [0, 1])
def test_expanded_sequence_equals_token_by_token_construction(batch_index):
    batch = micro_batches()[batch_index]
    expanded = expand_batch(batch, CFG, multiple=8)
    assert prepare_mmsp_inputs(batch, CFG).packed == (batch_index == 0)  # rows of 3 / 1 samples
    rows = reference_rows(batch, CFG)
    assert expanded.seq_length == -(-max(len(r["tokens"]) for r in rows) // 8) * 8
    visual = []
    for r, row in enumerate(rows):
        n = len(row["tokens"])
        ids = [int(batch.input_ids[r, i]) if kind == "text" else None for kind, i in row["tokens"]]
        text = [t for t, i in enumerate(ids) if i is not None]
        assert expanded.input_ids[r, text].tolist() == [ids[t] for t in text]
        assert expanded.labels[r, :n].tolist() == row["labels"]
        assert expanded.position_ids[r, :n].tolist() == row["positions"]
        assert expanded.segment_ids[r, :n].tolist() == row["segments"]
        # Padding: no loss, its own segment.
        assert (expanded.labels[r, n:] == IGNORE_INDEX).all()
        assert (expanded.segment_ids[r, n:] == PAD_SEGMENT).all()
        visual += [r * expanded.seq_length + t for t, i in enumerate(ids) if i is None]
    assert expanded.visual_positions.tolist() == visual
    # Visual tokens are never targets; a sample's last token predicts nothing.
    targets = expanded.labels[expanded.labels >= 0]
    assert not ((targets == CFG.image_token_id) | (targets == CFG.video_token_id)).any()


@pytest.mark.parametrize("sp", [1, 2, 3, 4])
def test_shards_and_route_deliver_every_visual_token_to_its_position(sp):
    """Simulate the all-to-all with the routes: each visual token lands exactly at the slot of
    the rank whose zigzag shard holds its position, and the shards are the zigzag split."""
    batch = micro_batches()[0]
    expanded = expand_batch(batch, CFG, multiple=2 * sp)
    seq, b = expanded.seq_length, batch.batch_size
    inputs = [prepare_mmsp_inputs(batch, CFG, sp, r) for r in range(sp)]
    tokens_per_frame = CFG.tokens_per_frame
    outgoing = []  # per source: the global visual-token ids it sends, split by destination
    for r, x in enumerate(inputs):
        for name in ("input_ids", "labels", "position_ids", "segment_ids"):
            assert torch.equal(getattr(x, name), split_zigzag(getattr(expanded, name), sp, r))
        start = frame_range(batch.num_frames, sp, r)[0] * tokens_per_frame
        encoded = torch.arange(start, start + x.route.num_local_tokens)  # token ids as payload
        outgoing.append(encoded[x.route.send_index].split(x.route.send_counts))
    delivered = 0
    for r, x in enumerate(inputs):
        received = torch.cat([outgoing[src][r] for src in range(sp)])
        assert [len(outgoing[src][r]) for src in range(sp)] == x.route.recv_counts
        local_positions = shard_token_indices(seq, sp, r)
        rows, columns = x.route.recv_slots % b, x.route.recv_slots // b
        assert torch.equal(
            rows * seq + local_positions[columns], expanded.visual_positions[received]
        )
        delivered += len(received)
    assert delivered == expanded.visual_positions.numel() == batch.num_frames * tokens_per_frame


def test_bad_batches_fail_with_the_numbers():
    batch = micro_batches()[0]
    missing = make_batch([[[3], [1]]], seed=1)
    missing.media.pop()
    with pytest.raises(ValueError, match=r"has 2 <image>/<video> placeholder tokens .* 1 media"):
        prepare_mmsp_inputs(missing, CFG)

    small = make_batch([[[2]]], seed=2)
    small.media[0] = small.media[0][:, :, :28, :28]
    with pytest.raises(
        ValueError, match=r"media item 0 is torch.float32 \(2, 3, 28, 28\).*3, 42, 42"
    ):
        prepare_mmsp_inputs(small, CFG)
    large = make_batch([[[2]]], seed=2)
    large.media[0] = torch.zeros(2, 3, 44, 30, dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"uint8 pixels \[frames >= 1, 3, h, w\] with h, w <= 42"):
        prepare_mmsp_inputs(large, CFG)

    short = LongVILAConfig.preset("tiny", max_seq_length=64)
    with pytest.raises(ValueError, match=r"row 1 is 80 tokens long .* 1 media items \(17 frames"):
        prepare_mmsp_inputs(batch, short, 2, 0)
    assert short.seq_length_limit == 64
    assert CFG.seq_length_limit == CFG.llm.max_position_embeddings


@pytest.mark.parametrize("sp", [1, 2, 3, 4])
def test_uint8_pixels_become_the_same_tower_input_as_normalized_frames(sp):
    """The model's first stage normalizes the loader's uint8 pixels (each item centred on the
    mean colour) to exactly what normalizing them beforehand gives, for any frame share."""
    for index, batch in enumerate(micro_batches()):
        pixels, normalized = uint8_media(batch, seed=index)
        for r in range(sp):
            got = prepare_mmsp_inputs(pixels, CFG, sp, r).frames
            expected = prepare_mmsp_inputs(normalized, CFG, sp, r).frames
            assert got.dtype == torch.float32 and got.shape == expected.shape
            torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    # Hand check of one padded item: the mean colour (0 after normalization) around the pixels.
    frames = prepare_mmsp_inputs(pixels, CFG, 1, 0).frames
    item = pixels.media[0].float()
    mean = torch.tensor(CFG.vision.image_mean).view(3, 1, 1)
    std = torch.tensor(CFG.vision.image_std).view(3, 1, 1)
    left = (CFG.vision.image_size - 28) // 2
    torch.testing.assert_close(
        frames[: len(item), :, :, left : left + 28], (item / 255 - mean) / std, atol=1e-6, rtol=0
    )
    assert frames[: len(item), :, :, :left].abs().max() == 0
