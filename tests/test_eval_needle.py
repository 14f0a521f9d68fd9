"""Needle-in-a-haystack harness with scripted predictors whose right answers are known.

The scripted predictor really reads the video it is given: it finds the white needle frames and
identifies the number by comparing them pixel for pixel with rendered candidates — but only
within its first ``horizon`` frames (a model with a short memory). Reference: for every trial the
needle's frame index computed here from the depth (``round(depth · haystack frames)``); the
predictor is right iff that index is below the horizon, and otherwise, with option scoring, iff
the first option (all scores tie) is the needle. Accuracies per cell must equal these exactly.
"""

from __future__ import annotations

import json

import pytest
import torch

from megatron_longvila.eval.cli import format_summary
from megatron_longvila.eval.heatmap import plot_needle_heatmap
from megatron_longvila.eval.needle import (
    Haystack,
    NeedleSettings,
    insert_needle,
    needle_trials,
    render_needle,
    run_needle_eval,
    write_synthetic_haystack,
)
from megatron_longvila.eval.results_file import SettingsMismatch

HORIZON = 10


class ReadingPredictor:
    """Reads the needle from the frames it can see (the first ``horizon``)."""

    def __init__(self, horizon: int, needle_range: int = 100) -> None:
        self.horizon = horizon
        self.needle_range = needle_range
        self.calls = 0

    def _read(self, video: torch.Tensor, candidates) -> str | None:
        seen = video[: self.horizon]
        white = [f for f in seen if f.float().mean() > 200]
        if not white:
            return None
        _, h, w = white[0].shape
        for text in candidates:
            if torch.equal(render_needle(text, w, h), white[0]):
                return text
        return None

    def answer(self, question, video, *, num_frames=None, max_new_tokens=64) -> str:
        self.calls += 1
        assert video.shape[0] == num_frames
        read = self._read(video, [str(v) for v in range(self.needle_range)])
        return f"The number is {read}." if read else "I cannot tell."

    def score_options(self, question, options, video, *, num_frames=None) -> list[float]:
        self.calls += 1
        assert video.shape[0] == num_frames
        read = self._read(video, options)
        return [1.0 if option == read else 0.0 for option in options]

    def describe(self) -> dict:
        return {"kind": "reading", "horizon": self.horizon}


class CrashingPredictor(ReadingPredictor):
    def __init__(self, horizon: int, crash_after: int) -> None:
        super().__init__(horizon)
        self.crash_after = crash_after

    def score_options(self, *args, **kwargs):
        if self.calls == self.crash_after:
            raise RuntimeError("stopped on purpose")
        return super().score_options(*args, **kwargs)


@pytest.fixture(scope="module")
def haystack(tmp_path_factory) -> Haystack:
    path = tmp_path_factory.mktemp("needle") / "haystack.mp4"
    return Haystack(write_synthetic_haystack(path, num_frames=40, width=32, height=32))


def _settings(**overrides) -> NeedleSettings:
    values = dict(frame_counts=[8, 16, 32], depths=[0.0, 0.5, 1.0], trials=3, needle_frames=2)
    return NeedleSettings(**{**values, **overrides})


def _expected_grid(settings: NeedleSettings) -> list[list[float]]:
    hits = {}
    for t in needle_trials(settings):
        position = round(t.depth * (t.frames - settings.needle_frames))
        right = position < HORIZON or (settings.scoring == "options" and t.options[0] == t.needle)
        hits.setdefault((t.depth, t.frames), []).append(right)
    return [
        [sum(hits[d, n]) / len(hits[d, n]) for n in settings.frame_counts] for d in settings.depths
    ]


@pytest.mark.parametrize("scoring", ["options", "exact"])
def test_cell_accuracies_are_exact(haystack, tmp_path, scoring):
    settings = _settings(scoring=scoring)
    summary = run_needle_eval(ReadingPredictor(HORIZON), haystack, settings, tmp_path / "n.json")
    expected = _expected_grid(settings)
    assert summary["grid"]["accuracy"] == expected
    assert summary["trials"] == 27
    # The sweep really spans both outcomes: early needles found, late ones missed.
    assert expected[0] == [1.0, 1.0, 1.0] and expected[2][2] < 1.0
    report = json.loads((tmp_path / "n.json").read_text())
    assert report["complete"] and report["summary"] == summary
    assert report["settings"]["model"] == {"kind": "reading", "horizon": HORIZON}
    assert report["settings"]["needle"]["frame_counts"] == [8, 16, 32]
    assert report["settings"]["haystack"]["frames"] == 40
    assert summary["chance"] == (0.25 if scoring == "options" else None)
    table = format_summary("needle", {**summary, "heatmap": "h.png"}, tmp_path / "n.json")
    assert "| 0% | 100.0% | 100.0% | 100.0% |" in table.splitlines()


def test_resume_runs_only_what_is_left(haystack, tmp_path):
    settings = _settings()
    out = tmp_path / "n.json"
    with pytest.raises(RuntimeError, match="stopped on purpose"):
        run_needle_eval(CrashingPredictor(HORIZON, crash_after=5), haystack, settings, out)
    partial = json.loads(out.read_text())
    assert len(partial["records"]) == 5 and not partial["complete"]

    resumed = ReadingPredictor(HORIZON)
    summary = run_needle_eval(resumed, haystack, settings, out)
    assert resumed.calls == 27 - 5
    fresh = run_needle_eval(ReadingPredictor(HORIZON), haystack, settings, tmp_path / "f.json")
    assert summary == fresh
    with pytest.raises(SettingsMismatch, match=r"needle\.trials: 3 -> 4"):
        run_needle_eval(ReadingPredictor(HORIZON), haystack, _settings(trials=4), out)


def test_needle_placement_and_haystack(haystack):
    frames = haystack.frames(6)
    assert frames.shape == (6, 3, 32, 32) and frames.dtype == torch.uint8
    needle = render_needle("7", 32, 32).expand(2, -1, -1, -1)
    for depth, at in [(0.0, 0), (0.5, 3), (1.0, 6), (0.3, 2)]:
        video = insert_needle(frames, needle, depth)
        assert video.shape[0] == 8
        assert torch.equal(video[at : at + 2], needle)
        assert torch.equal(torch.cat([video[:at], video[at + 2 :]]), frames)
    with pytest.raises(ValueError, match="has 40 frames; 41 were asked for"):
        haystack.frames(41)
    with pytest.raises(ValueError, match="depths must lie in"):
        _settings(depths=[1.5])
    with pytest.raises(ValueError, match="leave no haystack"):
        _settings(frame_counts=[2])


def test_heatmap_png(tmp_path):
    import matplotlib.image

    path = plot_needle_heatmap([[1.0, 0.5], [0.0, None]], [8, 16], [0.0, 1.0], tmp_path / "h.png")
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 50 and image.shape[1] > 50
    with pytest.raises(ValueError, match="expected depths × frames = 3×2"):
        plot_needle_heatmap([[1.0, 0.5]], [8, 16], [0.0, 0.5, 1.0], tmp_path / "x.png")
    # With the per-length panel and the chance level: a taller figure of the same width.
    both = plot_needle_heatmap(
        [[1.0, 0.5], [0.0, None]],
        [8, 16],
        [0.0, 1.0],
        tmp_path / "b.png",
        by_frames=[0.5, 0.5],
        chance=0.25,
    )
    panels = matplotlib.image.imread(both)
    assert panels.shape[1] == image.shape[1] and panels.shape[0] > image.shape[0]
    with pytest.raises(ValueError, match="2 per-length accuracies for 3 lengths"):
        plot_needle_heatmap(
            [[1.0, 0.5, 1.0]], [8, 16, 32], [0.0], tmp_path / "y.png", by_frames=[1.0, 0.5]
        )
