"""First-fit-decreasing packing and row collation. References: the input lengths (every index
exactly once, no group over capacity) and a hand-worked example; rows rebuilt from the inputs."""

from __future__ import annotations

import random

import torch

from megatron_longvila.data.batch import IGNORE_INDEX, PAD_SEGMENT, MultimodalSample
from megatron_longvila.data.packing import collate_rows, pack_first_fit


def test_first_fit_decreasing_keeps_every_sample_once_within_capacity():
    assert pack_first_fit([5, 9, 3, 7, 1], 10) == [[1, 4], [2, 3], [0]]
    rng = random.Random(0)
    for _ in range(200):
        lengths = [rng.randint(1, 50) for _ in range(rng.randint(1, 30))]
        groups = pack_first_fit(lengths, 50)
        assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
        assert all(sum(lengths[i] for i in g) <= 50 for g in groups)
        # First fit leaves at most one group at most half full.
        loads = sorted(sum(lengths[i] for i in g) for g in groups)
        assert len(loads) < 2 or loads[1] > 25


def test_rows_concatenate_samples_and_pad():
    def sample(key, n, frames):
        ids = torch.arange(1, n + 1) + 100 * len(key)
        labels = torch.where(ids % 2 == 0, ids, torch.full_like(ids, IGNORE_INDEX))
        media = [torch.full((frames, 3, 2, 2), float(n))] if frames else []
        return MultimodalSample(key, ids, labels, media, ["video"] * len(media))

    a, b, c = sample("a", 3, 2), sample("bb", 4, 0), sample("ccc", 2, 1)
    batch = collate_rows([[a, b], [c]], pad_id=0)
    assert batch.keys == [["a", "bb"], ["ccc"]]
    assert batch.input_ids.tolist() == [
        [*a.input_ids.tolist(), *b.input_ids.tolist()],
        [*c.input_ids.tolist(), 0, 0, 0, 0, 0],
    ]
    assert batch.segment_ids.tolist() == [[0, 0, 0, 1, 1, 1, 1], [0, 0, *[PAD_SEGMENT] * 5]]
    assert batch.labels[1, 2:].eq(IGNORE_INDEX).all()
    assert torch.equal(batch.labels[0, 3:], b.labels)
    assert [m.shape[0] for m in batch.media] == [2, 1] and batch.num_frames == 3
