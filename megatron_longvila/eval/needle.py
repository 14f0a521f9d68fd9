"""Video needle-in-a-haystack: can the model find a few frames showing an answer in a long video?

For every cell of the sweep (frames shown × needle depth) and every trial, ``n - k`` frames are
sampled uniformly from the haystack video and ``k`` needle frames — the needle's text in black
on white, as in :mod:`megatron_longvila.data.synthetic` — are inserted at the depth (0 = before
the first haystack frame, 1 = after the last). The model is asked the question and either

* ``scoring="options"``: scores the right needle and ``num_options - 1`` distractors; correct
  when the right one scores highest (chance ``1 / num_options``), or
* ``scoring="exact"``: generates an answer; correct when the needle appears in it as a word.

Each trial draws its needle (and distractors) from a seed made of the cell and trial, so a
resumed or repeated run asks the same questions.
"""

from __future__ import annotations

import random
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from megatron_longvila.data.pixel_font import draw_text_centered
from megatron_longvila.data.synthetic import SyntheticVideoSpec, write_synthetic_video
from megatron_longvila.data.video import decode_frames, probe_video, uniform_frame_indices
from megatron_longvila.eval.predictor import Predictor, best_option
from megatron_longvila.eval.results_file import ResultsFile, progress

SCORINGS = ("options", "exact")


@dataclass
class NeedleSettings:
    frame_counts: list[int] = field(default_factory=lambda: [8, 16, 32])
    #: Needle depths as fractions of the video, 0..1.
    depths: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])
    trials: int = 2
    needle_frames: int = 1
    scoring: str = "options"
    num_options: int = 4
    #: Needles are numbers below this (10: one digit, 100: up to two digits).
    needle_range: int = 100
    question: str = "What number appears in the video?"
    max_new_tokens: int = 8
    seed: int = 0

    def __post_init__(self) -> None:
        if self.scoring not in SCORINGS:
            raise ValueError(f"scoring must be one of {SCORINGS}, got {self.scoring!r}")
        if not self.frame_counts or not self.depths or self.trials < 1:
            raise ValueError(
                f"need frame counts, depths and trials >= 1; got {self.frame_counts}, "
                f"{self.depths}, {self.trials}"
            )
        bad_depths = [d for d in self.depths if not 0.0 <= d <= 1.0]
        if bad_depths:
            raise ValueError(f"depths must lie in [0, 1], got {bad_depths}")
        too_few = [n for n in self.frame_counts if n <= self.needle_frames]
        if too_few:
            raise ValueError(
                f"frame counts {too_few} leave no haystack around "
                f"{self.needle_frames} needle frames"
            )
        if self.scoring == "options" and not 2 <= self.num_options <= self.needle_range:
            raise ValueError(
                f"num_options={self.num_options} must be in [2, needle_range={self.needle_range}]"
            )


@dataclass(frozen=True)
class NeedleTrial:
    frames: int
    depth: float
    trial: int
    needle: str
    options: tuple[str, ...]  # empty for exact-match scoring

    @property
    def key(self) -> str:
        return f"frames={self.frames}/depth={self.depth:g}/trial={self.trial}"


def needle_trials(settings: NeedleSettings) -> list[NeedleTrial]:
    """Every (frames, depth, trial) of the sweep with its needle and shuffled options."""
    trials = []
    for frames in settings.frame_counts:
        for depth in settings.depths:
            for trial in range(settings.trials):
                rng = random.Random(f"{settings.seed}/{frames}/{depth:g}/{trial}")
                if settings.scoring == "options":
                    values = rng.sample(range(settings.needle_range), settings.num_options)
                    options = tuple(str(v) for v in values)
                    needle = options[0]
                    options = tuple(rng.sample(options, len(options)))
                else:
                    needle, options = str(rng.randrange(settings.needle_range)), ()
                trials.append(NeedleTrial(frames, depth, trial, needle, options))
    return trials


def render_needle(text: str, width: int, height: int) -> torch.Tensor:
    """One needle frame: ``text`` in black on white, uint8 [3, height, width]."""
    image = np.full((height, width, 3), 255, dtype=np.uint8)
    draw_text_centered(image, text, (0, 0, 0))
    return torch.from_numpy(image).permute(2, 0, 1)


def insert_needle(haystack: torch.Tensor, needle: torch.Tensor, depth: float) -> torch.Tensor:
    """haystack [m, 3, H, W], needle [k, 3, H, W] -> [m + k, 3, H, W] with the needle starting
    at frame ``round(depth · m)``."""
    at = round(depth * haystack.shape[0])
    return torch.cat([haystack[:at], needle, haystack[at:]])


class Haystack:
    """Frames sampled uniformly from a video file, decoded once per count, scaled so the longer
    side is at most ``max_side`` (the model resizes again; this bounds memory)."""

    def __init__(self, path: str | Path, max_side: int = 448) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"haystack video {self.path} does not exist")
        self._data = self.path.read_bytes()
        self.info = probe_video(self._data)
        scale = min(1.0, max_side / max(self.info.width, self.info.height))
        # Even sizes: swscale and the needle font are happiest with them.
        self.width = max(16, round(self.info.width * scale / 2) * 2)
        self.height = max(16, round(self.info.height * scale / 2) * 2)
        self._cache: dict[int, torch.Tensor] = {}

    def frames(self, count: int) -> torch.Tensor:
        """uint8 [count, 3, height, width]."""
        if count > self.info.num_frames:
            raise ValueError(
                f"haystack {self.path} has {self.info.num_frames} frames; {count} were asked for"
            )
        if count not in self._cache:
            indices = uniform_frame_indices(self.info.num_frames, count)
            frames = decode_frames(self._data, indices, (self.width, self.height))
            self._cache = {count: torch.stack(frames)}  # one count at a time: bounded memory
        return self._cache[count]


def write_synthetic_haystack(
    path: str | Path, num_frames: int, width: int = 64, height: int = 64, seed: int = 0
) -> Path:
    """A video of moving shapes without a needle (see :mod:`~megatron_longvila.data.synthetic`)."""
    spec = SyntheticVideoSpec(num_frames=num_frames, width=width, height=height, seed=seed)
    return write_synthetic_video(path, spec).path


def needle_found(answer: str, needle: str) -> bool:
    """Exact-match scoring: the needle appears in the answer as a whole word."""
    return re.search(rf"(?<![\w]){re.escape(needle.lower())}(?![\w])", answer.lower()) is not None


def run_trial(
    predictor: Predictor, haystack: Haystack, settings: NeedleSettings, trial: NeedleTrial
) -> dict:
    """Ask one trial; the record says what was asked, answered and whether it was right."""
    needle = render_needle(trial.needle, haystack.width, haystack.height)
    needles = needle.expand(settings.needle_frames, -1, -1, -1)
    video = insert_needle(
        haystack.frames(trial.frames - settings.needle_frames), needles, trial.depth
    )
    record = {"frames": trial.frames, "depth": trial.depth, "trial": trial.trial}
    record["needle"] = trial.needle
    if settings.scoring == "options":
        scores = predictor.score_options(
            settings.question, list(trial.options), video, num_frames=trial.frames
        )
        chosen = trial.options[best_option(scores)]
        record.update(options=list(trial.options), scores=scores, prediction=chosen)
        record["correct"] = chosen == trial.needle
    else:
        text = predictor.answer(
            settings.question,
            video,
            num_frames=trial.frames,
            max_new_tokens=settings.max_new_tokens,
        )
        record.update(prediction=text, correct=needle_found(text, trial.needle))
    return record


def accuracy_grid(records: dict[str, dict], settings: NeedleSettings) -> list[list[float | None]]:
    """Accuracy [len(depths)][len(frame_counts)] (None where no trial is recorded)."""
    grid: list[list[float | None]] = []
    for depth in settings.depths:
        row = []
        for frames in settings.frame_counts:
            hits = [
                r["correct"]
                for r in records.values()
                if r["frames"] == frames and r["depth"] == depth
            ]
            row.append(sum(hits) / len(hits) if hits else None)
        grid.append(row)
    return grid


def summarize(records: dict[str, dict], settings: NeedleSettings) -> dict:
    hits = [r["correct"] for r in records.values()]
    by_frames = {}
    for frames in settings.frame_counts:
        cell = [r["correct"] for r in records.values() if r["frames"] == frames]
        by_frames[str(frames)] = sum(cell) / len(cell) if cell else None
    return {
        "accuracy": sum(hits) / len(hits) if hits else None,
        "trials": len(hits),
        "chance": 1 / settings.num_options if settings.scoring == "options" else None,
        "accuracy_by_frames": by_frames,
        "grid": {
            "rows_depths": settings.depths,
            "columns_frames": settings.frame_counts,
            "accuracy": accuracy_grid(records, settings),
        },
    }


def run_needle_eval(
    predictor: Predictor,
    haystack: Haystack,
    settings: NeedleSettings,
    output: str | Path,
    resume: bool = True,
) -> dict:
    """Run the sweep (every rank calls this with the same arguments); write ``output`` on
    rank 0; return the summary (see :func:`summarize`)."""
    recorded = {
        "needle": asdict(settings),
        "haystack": {
            "path": str(haystack.path),
            "frames": haystack.info.num_frames,
            "size": [haystack.width, haystack.height],
        },
        "model": predictor.describe(),
    }
    results = ResultsFile(output, "needle", recorded, resume=resume)
    trials = needle_trials(settings)
    # Trials of one frame count run together: the haystack frames are decoded once per count.
    todo = [t for t in trials if not results.done(t.key)]
    for trial in progress(todo, total=len(todo), desc="needle"):
        results.add(trial.key, run_trial(predictor, haystack, settings, trial))
    summary = summarize(results.records, settings)
    results.finish(summary)
    return summary
