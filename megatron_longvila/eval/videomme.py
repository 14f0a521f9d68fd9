"""VideoMME-format multiple choice: accuracy overall, per duration class, with/without subtitles.

Questions come in the benchmark's published format, either flat (one record per question, as in
its parquet/JSON release) or nested (one record per video with a ``questions`` list)::

    {"video_id": "001", "videoID": "fFjv93ACGo8", "duration": "short", "domain": "...",
     "question_id": "001-1", "task_type": "Counting Problem", "question": "...",
     "options": ["A. ...", "B. ...", "C. ...", "D. ..."], "answer": "C"}

Videos are ``<videos>/<videoID>.<mp4|mkv|webm|avi|mov>`` (``video_id`` when there is no
``videoID``); subtitles, optional, ``<subtitles>/<videoID>.srt``. With subtitles, the cues on
screen at the sampled frames' times are listed before the question, as the benchmark's own
evaluation does; a video without a subtitle file gets the plain prompt. A question whose video
is missing or unreadable is recorded as skipped and counted, and the run goes on.

The model either answers freely (``mode="generate"``; the letter is read by
:func:`~.answer_parsing.parse_choice`, an unreadable answer counts as wrong) or scores the
letters as continuations of the prompt (``mode="options"``).
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from megatron_longvila.data.video import VideoDecodeError, probe_video, uniform_frame_indices
from megatron_longvila.eval.answer_parsing import option_letters, parse_choice, strip_option_label
from megatron_longvila.eval.predictor import Predictor, best_option
from megatron_longvila.eval.results_file import ResultsFile, progress
from megatron_longvila.eval.subtitles import cues_at, read_srt

DURATIONS = ("short", "medium", "long")
VARIANTS = ("without_subtitles", "with_subtitles")
VIDEO_EXTENSIONS = ("mp4", "mkv", "webm", "avi", "mov")
MODES = ("generate", "options")
INSTRUCTION = (
    "Select the best answer to the following multiple-choice question based on the video. "
    "Respond with only the letter ({letters}) of the correct option."
)


@dataclass(frozen=True)
class VideoMMEQuestion:
    question_id: str
    video_id: str  # the file name stem (videoID)
    duration: str
    question: str
    options: tuple[str, ...]  # texts without their "A. " labels
    answer: str  # letter
    task_type: str = ""


def _question_from(record: dict, video: dict) -> VideoMMEQuestion:
    merged = {**video, **record}
    missing = [k for k in ("question", "options", "answer") if k not in merged]
    stem = merged.get("videoID") or merged.get("video_id")
    if missing or stem is None:
        raise ValueError(
            f"question {merged.get('question_id', '?')}: missing fields "
            f"{missing + ([] if stem else ['videoID/video_id'])}"
        )
    options = tuple(strip_option_label(o) for o in merged["options"])
    letters = option_letters(len(options))
    answer = str(merged["answer"]).strip().upper()
    if answer not in letters:
        raise ValueError(
            f"question {merged.get('question_id')}: answer {answer!r} is not one of {letters}"
        )
    duration = str(merged.get("duration", "")).lower()
    return VideoMMEQuestion(
        question_id=str(merged.get("question_id", f"{stem}-{merged['question'][:20]}")),
        video_id=str(stem),
        duration=duration,
        question=merged["question"],
        options=options,
        answer=answer,
        task_type=str(merged.get("task_type", "")),
    )


def load_questions(path: str | Path) -> list[VideoMMEQuestion]:
    """Questions from a ``.json`` (a list, or ``{"questions": [...]}``), ``.jsonl`` or
    ``.parquet`` file (parquet needs pyarrow), flat or nested by video."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"question file {path} does not exist")
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise ImportError(f"reading {path} needs pyarrow (pip install pyarrow)") from None
        # The published release as is: one row per question, ``options`` a list of strings.
        rows = pq.read_table(path).to_pylist()
    elif path.suffix == ".jsonl":
        lines = path.read_text(encoding="utf-8").splitlines()
        rows = [json.loads(line) for line in lines if line.strip()]
    else:
        rows = json.loads(path.read_text(encoding="utf-8"))
        rows = rows.get("questions", rows) if isinstance(rows, dict) else rows
    questions = []
    for row in rows:
        nested = row.get("questions")
        for record in nested if nested is not None else [row]:
            questions.append(
                _question_from(record, {k: v for k, v in row.items() if k != "questions"})
            )
    ids = [q.question_id for q in questions]
    if len(set(ids)) != len(ids):
        repeated = sorted({i for i in ids if ids.count(i) > 1})[:5]
        raise ValueError(f"{path}: question ids repeat, e.g. {repeated}")
    return questions


def find_video(videos: Path, stem: str) -> Path | None:
    for ext in VIDEO_EXTENSIONS:
        candidate = videos / f"{stem}.{ext}"
        if candidate.is_file():
            return candidate
    return None


def build_prompt(question: VideoMMEQuestion, subtitles: Sequence[str] | None) -> str:
    letters = option_letters(len(question.options))
    lines = []
    if subtitles:
        lines += ["This video's subtitles are listed below:", *subtitles]
    lines.append(INSTRUCTION.format(letters=", ".join(letters[:-1]) + f", or {letters[-1]}"))
    lines.append(question.question)
    lines += [f"{letter}. {text}" for letter, text in zip(letters, question.options)]
    lines.append("The best answer is:")
    return "\n".join(lines)


@dataclass
class VideoMMESettings:
    num_frames: int = 8
    mode: str = "generate"
    variants: list[str] = field(default_factory=lambda: ["without_subtitles"])
    max_new_tokens: int = 16

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        unknown = [v for v in self.variants if v not in VARIANTS]
        if unknown or not self.variants:
            raise ValueError(
                f"variants must be a non-empty subset of {VARIANTS}, got {self.variants}"
            )


def subtitles_for(video: Path, subtitles_dir: Path | None, stem: str, num_frames: int) -> list[str]:
    """Cues on screen at the frames the predictor samples (uniformly, ``num_frames``)."""
    srt = subtitles_dir / f"{stem}.srt" if subtitles_dir else None
    if srt is None or not srt.is_file():
        return []
    info = probe_video(video.read_bytes())
    times = [i / info.fps for i in uniform_frame_indices(info.num_frames, num_frames)]
    return cues_at(read_srt(srt), times)


def answer_question(
    predictor: Predictor,
    question: VideoMMEQuestion,
    video: Path,
    subtitles: list[str] | None,
    settings: VideoMMESettings,
) -> dict:
    prompt = build_prompt(question, subtitles)
    letters = option_letters(len(question.options))
    record = {"subtitle_cues": len(subtitles or [])}
    if settings.mode == "options":
        scores = predictor.score_options(
            prompt, list(letters), video, num_frames=settings.num_frames
        )
        choice = letters[best_option(scores)]
        record["scores"] = scores
    else:
        text = predictor.answer(
            prompt, video, num_frames=settings.num_frames, max_new_tokens=settings.max_new_tokens
        )
        choice = parse_choice(text, question.options)
        record["response"] = text
    record.update(choice=choice, correct=choice == question.answer)
    return record


def _accuracy(records: list[dict]) -> dict:
    correct = sum(r["correct"] for r in records)
    return {"accuracy": correct / len(records) if records else None, "questions": len(records)}


def summarize(records: dict[str, dict], settings: VideoMMESettings) -> dict:
    summary = {}
    for variant in settings.variants:
        mine = [r for r in records.values() if r["variant"] == variant]
        answered = [r for r in mine if "skipped" not in r]
        by_duration = defaultdict(list)
        by_task = defaultdict(list)
        for r in answered:
            by_duration[r["duration"]].append(r)
            by_task[r["task_type"]].append(r)
        order = [d for d in DURATIONS if d in by_duration] + sorted(
            set(by_duration) - set(DURATIONS)
        )
        summary[variant] = {
            **_accuracy(answered),
            "unparsed": sum(r["choice"] is None for r in answered),
            "skipped": len(mine) - len(answered),
            "by_duration": {d: _accuracy(by_duration[d]) for d in order},
            "by_task_type": {t: _accuracy(by_task[t]) for t in sorted(by_task) if t},
        }
    return summary


def run_videomme(
    predictor: Predictor,
    questions: Sequence[VideoMMEQuestion],
    videos: str | Path,
    settings: VideoMMESettings,
    output: str | Path,
    subtitles: str | Path | None = None,
    resume: bool = True,
) -> dict:
    """Answer every question in every variant (all ranks, same arguments); write ``output`` on
    rank 0; return the summary: per variant accuracy, per duration, per task type."""
    videos = Path(videos)
    subtitles_dir = Path(subtitles) if subtitles is not None else None
    if "with_subtitles" in settings.variants and subtitles_dir is None:
        raise ValueError("the with_subtitles variant needs a subtitles folder")
    recorded = {
        "videomme": asdict(settings),
        "videos": str(videos),
        "subtitles": str(subtitles_dir) if subtitles_dir else None,
        "questions": len(questions),
        "model": predictor.describe(),
    }
    results = ResultsFile(output, "videomme", recorded, resume=resume)
    todo = [
        (q, v)
        for q in questions
        for v in settings.variants
        if not results.done(f"{q.question_id}/{v}")
    ]
    for question, variant in progress(todo, total=len(todo), desc="videomme"):
        record = {
            "question_id": question.question_id,
            "video_id": question.video_id,
            "duration": question.duration,
            "task_type": question.task_type,
            "variant": variant,
            "answer": question.answer,
        }
        video = find_video(videos, question.video_id)
        try:
            if video is None:
                raise FileNotFoundError(f"no video {question.video_id}.* in {videos}")
            cues = None
            if variant == "with_subtitles":
                cues = subtitles_for(video, subtitles_dir, question.video_id, settings.num_frames)
            record.update(answer_question(predictor, question, video, cues, settings))
        except (FileNotFoundError, VideoDecodeError) as exc:
            record["skipped"] = str(exc)
        results.add(f"{question.question_id}/{variant}", record)
    summary = summarize(results.records, settings)
    results.finish(summary)
    return summary
