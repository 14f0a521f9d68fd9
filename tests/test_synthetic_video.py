"""Synthetic videos: needle frames carry the rendered answer where the metadata says.

Reference: the font's own bitmap drawn on a blank frame; after lossy encoding the needle's
pixels must read dark (mean < 80) and its background light (mean > 175), and haystack frames
must not look like needles.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from data_fixtures import scratch_dir

from megatron_longvila.data.pixel_font import _GLYPHS, draw_text_centered, glyph, text_mask
from megatron_longvila.data.synthetic import (
    SyntheticVideoSpec,
    make_synthetic_dataset,
    write_synthetic_video,
)
from megatron_longvila.data.video import decode_frames, probe_video


def test_font_glyphs_are_distinct_and_text_is_laid_out_left_to_right():
    bitmaps = {char: glyph(char).tobytes() for char in _GLYPHS}
    assert len(set(bitmaps.values())) == len(bitmaps)
    mask = text_mask("A7", scale=2)
    assert mask.shape == (14, 22)
    np.testing.assert_array_equal(mask[:, :10], glyph("A").repeat(2, 0).repeat(2, 1))
    np.testing.assert_array_equal(mask[:, 12:], glyph("7").repeat(2, 0).repeat(2, 1))
    with pytest.raises(ValueError, match="not in the pixel font"):
        glyph("#")


@pytest.mark.parametrize(
    "depth, expected", [(0.0, [0, 1, 2]), (0.5, [22, 23, 24]), (1.0, [45, 46, 47])]
)
def test_needle_frames_show_the_answer_at_the_given_depth(depth, expected):
    spec = SyntheticVideoSpec(
        num_frames=48, width=96, height=64, needle_text="42", needle_depth=depth, needle_frames=3
    )
    video = write_synthetic_video(scratch_dir() / "needle" / f"n{depth}.mp4", spec)
    assert video.needle_frame_indices == expected
    data = video.path.read_bytes()
    assert probe_video(data).num_frames == 48
    mask = draw_text_centered(np.zeros((64, 96, 3), np.uint8), "42", (255, 255, 255))
    for index, frame in zip(range(48), decode_frames(data, list(range(48)))):
        gray = frame.float().mean(0).numpy()
        if index in expected:
            assert gray[mask].mean() < 80 and gray[~mask].mean() > 175, index
        else:
            assert gray.mean() < 120, f"haystack frame {index} looks like a needle"


def test_synthetic_dataset_lists_videos_and_conversations():
    jsonl = make_synthetic_dataset(
        scratch_dir() / "dataset", num_videos=4, num_frames=16, containers=("mp4", "webm")
    )
    records = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert [r["video"].rsplit(".", 1)[1] for r in records] == ["mp4", "webm", "mp4", "webm"]
    for r in records:
        assert (jsonl.parent / r["video"]).is_file()
        human, gpt = r["conversations"]
        assert human["value"].startswith("<video>\n") and gpt["value"]
        if r["needle_frames"]:
            assert "number" in human["value"] and gpt["value"].isdigit()


def test_synthetic_dataset_of_mixed_lengths_gives_each_video_its_length():
    jsonl = make_synthetic_dataset(
        scratch_dir() / "mixed",
        num_videos=5,
        num_frames=[8, 24],
        needle_fraction=1.0,
        needle_frames=2,
        width=32,
        height=32,
    )
    records = [json.loads(line) for line in jsonl.read_text().splitlines()]
    lengths = [probe_video((jsonl.parent / r["video"]).read_bytes()).num_frames for r in records]
    assert lengths == [8, 24, 8, 24, 8]
    for r, frames in zip(records, lengths):
        assert len(r["needle_frames"]) == 2 and max(r["needle_frames"]) < frames
    with pytest.raises(ValueError, match="empty sequence"):
        make_synthetic_dataset(scratch_dir() / "none", num_videos=1, num_frames=[])
