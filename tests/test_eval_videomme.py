"""VideoMME-format harness on a small synthetic benchmark with a scripted predictor.

Reference: each question's scripted response and the letter a person reads in it (hand-labelled
below); from those, the accuracies overall and per duration class, with and without subtitles,
are counted by hand in the test and must be reported exactly. Subtitles: the cue on screen at a
sampled frame's time must reach the prompt, a cue between sampled frames must not.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from megatron_longvila.data.synthetic import SyntheticVideoSpec, write_synthetic_video
from megatron_longvila.eval.subtitles import cues_at, parse_srt
from megatron_longvila.eval.videomme import (
    VideoMMESettings,
    build_prompt,
    load_questions,
    run_videomme,
)

SHOWN_CUE = "the red square is the clue"
HIDDEN_CUE = "no frame is sampled now"
# 16 frames at 8 fps, 4 sampled: frames 2, 6, 10, 14 at 0.25, 0.75, 1.25, 1.75 s.
SRT = f"""1
00:00:00,500 --> 00:00:01,000
<i>{SHOWN_CUE}</i>

2
00:00:01,300 --> 00:00:01,700
{HIDDEN_CUE}
"""
VIDEOS = {"vid_a": "short", "vid_b": "medium", "vid_c": "long", "vid_d": "short"}
OPTIONS = ["A. a red square", "B. a blue circle", "C. two shapes", "D. nothing moves"]
# question id: (video, duration, answer, response without subtitles, response with subtitles)
SCRIPT = {
    "q1": ("vid_a", "short", "B", "(B)", "B"),  # right, right
    "q2": ("vid_a", "short", "A", "The answer is C", "Answer: a) a red square"),  # wrong, right
    "q3": ("vid_b", "medium", "D", "Nothing moves.", None),  # right (no srt: same prompt)
    "q4": ("vid_b", "medium", "C", "I do not know.", None),  # unparsed
    "q5": ("vid_c", "long", "A", "A.", "B"),  # right, wrong
    "q6": ("vid_c", "long", "B", "The best answer is: (D)", "b) a blue circle"),  # wrong, right
    "q7": ("vid_d", "short", "C", "C", None),  # right
    "q8": ("vid_missing", "long", "A", "A", "A"),  # skipped: no video
}
SUBTITLED = {"vid_a", "vid_c"}


def _load(records: list[dict], folder: Path):
    path = folder / "questions.json"
    path.write_text(json.dumps(records))
    return load_questions(path)


class ScriptedPredictor:
    def __init__(self, videos: Path) -> None:
        self.videos = videos

    def _question_id(self, prompt: str) -> str:
        return next(q for q in SCRIPT if f"Question {q}?" in prompt)

    def answer(self, prompt, video, *, num_frames=None, max_new_tokens=64) -> str:
        qid = self._question_id(prompt)
        stem, _, _, plain, subtitled = SCRIPT[qid]
        assert Path(video) == self.videos / f"{stem}.mp4" and num_frames == 4
        assert prompt.rstrip().endswith("The best answer is:")
        if "subtitles are listed below" in prompt:
            assert SHOWN_CUE in prompt and HIDDEN_CUE not in prompt
            return subtitled
        return plain

    def score_options(self, prompt, options, video, *, num_frames=None) -> list[float]:
        assert list(options) == ["A", "B", "C", "D"]
        qid = self._question_id(prompt)
        guess = "A" if qid in ("q1", "q2") else SCRIPT[qid][2]  # q1 wrong, q2 right, rest right
        return [float(letter == guess) for letter in options]

    def describe(self) -> dict:
        return {"kind": "scripted"}


@pytest.fixture(scope="module")
def benchmark(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("videomme")
    for stem in VIDEOS:
        spec = SyntheticVideoSpec(num_frames=16, width=32, height=32, fps=8)
        write_synthetic_video(root / "videos" / f"{stem}.mp4", spec)
    (root / "subtitles").mkdir()
    for stem in SUBTITLED:
        (root / "subtitles" / f"{stem}.srt").write_text(SRT)
    nested = {}
    flat = []
    for qid, (stem, duration, answer, _, _) in SCRIPT.items():
        question = {"question_id": qid, "task_type": "Counting", "question": f"Question {qid}?"}
        question.update(options=OPTIONS, answer=answer)
        video = {"video_id": f"id_{stem}", "videoID": stem, "duration": duration}
        nested.setdefault(stem, {**video, "questions": []})["questions"].append(question)
        flat.append({**video, **question})
    (root / "nested.json").write_text(json.dumps(list(nested.values())))
    (root / "flat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in flat))
    return {"root": root, "questions": load_questions(root / "nested.json")}


def test_both_published_layouts_load_alike(benchmark):
    flat = load_questions(benchmark["root"] / "flat.jsonl")
    assert flat == benchmark["questions"]
    q = flat[0]
    assert (q.question_id, q.video_id, q.duration, q.answer) == ("q1", "vid_a", "short", "B")
    assert q.options == ("a red square", "a blue circle", "two shapes", "nothing moves")


def test_accuracy_per_duration_with_and_without_subtitles(benchmark, tmp_path):
    root = benchmark["root"]
    settings = VideoMMESettings(
        num_frames=4, variants=["without_subtitles", "with_subtitles"], mode="generate"
    )
    summary = run_videomme(
        ScriptedPredictor(root / "videos"),
        benchmark["questions"],
        root / "videos",
        settings,
        tmp_path / "videomme.json",
        subtitles=root / "subtitles",
    )
    plain, subbed = summary["without_subtitles"], summary["with_subtitles"]
    assert (plain["accuracy"], plain["questions"], plain["skipped"]) == (4 / 7, 7, 1)
    assert plain["unparsed"] == 1
    assert {d: v["accuracy"] for d, v in plain["by_duration"].items()} == {
        "short": 2 / 3,
        "medium": 1 / 2,
        "long": 1 / 2,
    }
    assert subbed["accuracy"] == 5 / 7
    assert {d: v["accuracy"] for d, v in subbed["by_duration"].items()} == {
        "short": 1.0,
        "medium": 1 / 2,
        "long": 1 / 2,
    }
    report = json.loads((tmp_path / "videomme.json").read_text())
    assert report["complete"] and len(report["records"]) == 16
    assert report["records"]["q8/without_subtitles"]["skipped"].startswith("no video vid_missing")
    assert report["records"]["q1/with_subtitles"]["subtitle_cues"] == 1
    assert report["settings"]["videomme"]["num_frames"] == 4


def test_option_scoring_mode(benchmark, tmp_path):
    root = benchmark["root"]
    summary = run_videomme(
        ScriptedPredictor(root / "videos"),
        benchmark["questions"],
        root / "videos",
        VideoMMESettings(num_frames=4, mode="options"),
        tmp_path / "options.json",
    )
    assert summary["without_subtitles"]["accuracy"] == 6 / 7
    assert summary["without_subtitles"]["by_duration"]["short"]["accuracy"] == 2 / 3


def test_subtitle_cues_and_prompt(tmp_path):
    cues = parse_srt(SRT)
    assert [(c.start_s, c.end_s) for c in cues] == [(0.5, 1.0), (1.3, 1.7)]
    assert cues[0].text == SHOWN_CUE  # markup removed
    assert cues_at(cues, [0.25, 0.75, 1.25, 1.75]) == [SHOWN_CUE]
    q = _load([{"videoID": "v", "question": "Q?", "options": OPTIONS, "answer": "b"}], tmp_path)[0]
    prompt = build_prompt(q, ["hello"])
    assert prompt.splitlines() == [
        "This video's subtitles are listed below:",
        "hello",
        "Select the best answer to the following multiple-choice question based on the video. "
        "Respond with only the letter (A, B, C, or D) of the correct option.",
        "Q?",
        "A. a red square",
        "B. a blue circle",
        "C. two shapes",
        "D. nothing moves",
        "The best answer is:",
    ]


def test_bad_questions_are_named(tmp_path):
    bad = [
        {"videoID": "v", "question_id": "x1", "question": "Q?", "options": OPTIONS, "answer": "E"}
    ]
    with pytest.raises(ValueError, match=r"question x1: answer 'E' is not one of ABCD"):
        _load(bad, tmp_path)
    with pytest.raises(ValueError, match=r"missing fields \['answer'\]"):
        _load([{"videoID": "v", "question": "Q?", "options": OPTIONS}], tmp_path)
    with pytest.raises(FileNotFoundError, match="question file"):
        load_questions(tmp_path / "none.json")


PUBLISHED_COLUMNS = (  # VideoMME's test parquet, in its order
    "video_id",
    "duration",
    "domain",
    "sub_category",
    "url",
    "videoID",
    "question_id",
    "task_type",
    "question",
    "options",
    "answer",
)


def _published_parquet(benchmark, path: Path) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [
        json.loads(line) for line in (benchmark["root"] / "flat.jsonl").read_text().splitlines()
    ]
    extra = {"domain": "Knowledge", "sub_category": "Humanity & History", "url": "https://x"}
    table = {name: [{**extra, **row}[name] for row in rows] for name in PUBLISHED_COLUMNS}
    pq.write_table(pa.table(table), path)
    return path


def test_the_published_parquet_reads_as_is(benchmark, tmp_path):
    path = _published_parquet(benchmark, tmp_path / "test-00000-of-00001.parquet")
    assert load_questions(path) == benchmark["questions"]


def test_the_command_reads_its_questions_before_loading_the_model(
    benchmark, tmp_path, monkeypatch, capsys
):
    import sys

    from megatron_longvila.eval import cli

    def no_model(args):
        raise AssertionError("the model was loaded before the questions were read")

    monkeypatch.setattr(cli, "load_predictor", no_model)
    parquet = _published_parquet(benchmark, tmp_path / "questions.parquet")
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps([{"question_id": "x", "videoID": "v", "question": "?"}]))
    argv = ["videomme", "--checkpoint", str(tmp_path / "ckpt"), "--output", str(tmp_path / "o")]
    argv += ["--videos", str(benchmark["root"] / "videos")]
    assert cli.main([*argv, "--questions", str(broken)]) == 2
    assert "question x: missing fields ['options', 'answer']" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # not installed
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    assert cli.main([*argv, "--questions", str(parquet)]) == 2
    assert f"reading {parquet} needs pyarrow" in capsys.readouterr().err
