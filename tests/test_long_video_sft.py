"""The long-video instruction builder: clip splitting, prompts, QA parsing, and the whole build
on synthetic videos with tiny local models.

References: the scene cuts planted in the synthetic videos (clip counts must match exactly, cut
frames to within one analysis step); hand-computed clip plans for the length rules; the list of
videos put in (each finished one must load once through ``build_train_loader``, the corrupt one
must be reported); for resume, the number of model calls a restarted build makes (zero for
finished videos, exactly one caption per clip plus two text calls for a new one). The tiny
models have random weights, so captions are gibberish; the text model of the main build answers
a fixed text through its own generation config (``tiny_generators``), so the QA path runs on a
real ``generate`` and its parse is checked; a babbling text model checks the fallback. A plug-in
captioner ("py:" spec, loaded in the worker processes) that kills its process checks that the
videos in flight are reported and the build goes on. A tiny LongVILA checkpoint as captioner
("longvila:" spec) must record exactly the captions ``Generator.generate`` gives for the same
frames and prompts on a separately loaded model.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from data_fixtures import data_config, scratch_dir, tiny_tokenizer_dir
from tiny_generators import save_tiny_text_model, save_tiny_vlm

from megatron_longvila.data.loader import build_train_loader
from megatron_longvila.data.synthetic import SyntheticVideoSpec, write_synthetic_video
from megatron_longvila.data.video import decode_frames, probe_video
from megatron_longvila.data.vision_transform import decode_image, to_tower_input
from megatron_longvila.long_video_sft.annotate import (
    AnnotationConfig,
    VideoAnnotator,
    caption_frame_size,
    clip_frame_indices,
)
from megatron_longvila.long_video_sft.build import BuildConfig, build_long_video_sft
from megatron_longvila.long_video_sft.captioners import (
    HFVisionCaptioner,
    load_captioner,
    parse_captioner_spec,
)
from megatron_longvila.long_video_sft.clips import (
    Clip,
    ClipConfig,
    find_clips,
    plan_clips,
)
from megatron_longvila.long_video_sft.prompts import load_templates
from megatron_longvila.long_video_sft.qa_format import format_captions, parse_qa_pairs
from megatron_longvila.long_video_sft.result_cache import ResultCache, video_key
from megatron_longvila.long_video_sft.scenes import FrameDifferences, detect_cuts
from megatron_longvila.long_video_sft.text_generators import HFTextGenerator

FPS, FRAMES = 8, 64
# One second of minimum clip length = 8 frames; analysis at 4 fps compares every 2nd frame.
CLIPS = ClipConfig(min_clip_s=1.0, fixed_clip_s=2.0, max_clip_s=30.0, analysis_fps=4.0)
STEP = 2

# ---- clip plans ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cuts, num_frames, config, expected, method",
    [
        # 20 closes a 4-frame clip after 16 (< 8 frames): dropped.
        ([16, 20, 50], 64, CLIPS, [(0, 16), (16, 50), (50, 64)], "scenes"),
        # The last clip would be 4 frames: its cut is dropped; none left -> fixed 2 s clips.
        ([60], 64, CLIPS, [(0, 16), (16, 32), (32, 48), (48, 64)], "fixed"),
        # A 56-frame scene over max 3 s (24 frames): 3 equal parts.
        (
            [8],
            64,
            ClipConfig(min_clip_s=1, fixed_clip_s=2, max_clip_s=3),
            [(0, 8), (8, 27), (27, 45), (45, 64)],
            "scenes",
        ),
        # Fixed 16-frame clips over 70 frames: the 6-frame tail joins the last clip.
        ([], 70, CLIPS, [(0, 16), (16, 32), (32, 48), (48, 70)], "fixed"),
        # method="fixed" ignores cuts.
        (
            [30],
            64,
            ClipConfig(method="fixed", min_clip_s=1, fixed_clip_s=4),
            [(0, 32), (32, 64)],
            "fixed",
        ),
        # A 40-frame scene over max 3 s is split in two; the 24-frame one fits.
        (
            [40],
            64,
            ClipConfig(min_clip_s=1, fixed_clip_s=2, max_clip_s=3),
            [(0, 20), (20, 40), (40, 64)],
            "scenes",
        ),
    ],
)
def test_plan_clips_follows_the_length_rules(cuts, num_frames, config, expected, method):
    plan = plan_clips(cuts, num_frames, FPS, config)
    assert [(c.start, c.end) for c in plan.clips] == expected
    assert plan.method == method
    assert plan.cuts == cuts


def test_detect_cuts_needs_a_jump_over_local_motion():
    # Frames 2..12 in steps of 2: steady motion 0.02, a cut of 0.5 at frame 6, then a fast pan
    # where every difference is 0.2 (above the threshold, but no jump over its neighbours).
    values = [0.02, 0.02, 0.5, 0.02, 0.2, 0.2, 0.2, 0.2]
    diffs = FrameDifferences(
        positions=np.arange(2, 2 + 2 * len(values), 2),
        values=np.asarray(values),
        num_frames=18,
    )
    assert detect_cuts(diffs, threshold=0.1, adaptive_ratio=3.0) == [6]
    assert detect_cuts(diffs, threshold=0.1, adaptive_ratio=0.0) == [6, 10, 12, 14, 16]


def _scene_video(
    path: Path, scene_starts: tuple[int, ...], texture: int = 0, width: int = 64
) -> Path:
    spec = SyntheticVideoSpec(
        num_frames=FRAMES,
        width=width,
        height=48,
        fps=FPS,
        seed=len(scene_starts) + texture,
        texture=texture,
        scene_starts=scene_starts,
    )
    return write_synthetic_video(path, spec).path


def _expected_clips(scene_starts: tuple[int, ...]) -> int:
    """One clip per scene; without cuts, 2 s fixed clips of 64 frames at 8 fps."""
    return len(scene_starts) + 1 if scene_starts else FRAMES // (2 * FPS)


@pytest.mark.parametrize(
    "scene_starts, ext, texture, analysis_fps",
    [
        ((21,), "mp4", 0, 4.0),
        ((10, 27, 41), "webm", 12, None),  # every frame compared: cut frames exact
        ((9, 20, 33, 47, 56), "mkv", 12, 4.0),
        ((), "mp4", 12, 4.0),  # no cut: fixed-length fallback
    ],
)
def test_scene_cuts_of_synthetic_videos_are_found(scene_starts, ext, texture, analysis_fps):
    path = _scene_video(
        scratch_dir() / "lvsft-scenes" / f"v{len(scene_starts)}.{ext}", scene_starts, texture
    )
    data = path.read_bytes()
    config = ClipConfig(min_clip_s=1.0, fixed_clip_s=2.0, analysis_fps=analysis_fps)
    plan = find_clips(data, probe_video(data), config)
    step = 1 if analysis_fps is None else STEP
    assert len(plan.clips) == _expected_clips(scene_starts)
    assert plan.method == ("scenes" if scene_starts else "fixed")
    starts = [clip.start for clip in plan.clips[1:]]
    if scene_starts:
        assert all(0 <= found - planted < step for found, planted in zip(starts, scene_starts))
        assert plan.cuts == starts
    assert plan.clips[0].start == 0 and plan.clips[-1].end == FRAMES


# ---- prompts and QA text ------------------------------------------------------------------


def test_parse_qa_pairs_accepts_common_variants():
    text = (
        "Here are the questions.\n"
        "Q: What colour is the square?\nA: Red.\n"
        "1. **Question 2:** How many shapes\nmove at the start?\n**Answer:** Two, then\nthree.\n"
        "- q3: A question without an answer\n"
        "Q: Last?\nanswer: Yes.\n"
    )
    assert parse_qa_pairs(text) == [
        ("What colour is the square?", "Red."),
        ("How many shapes move at the start?", "Two, then three."),
        ("Last?", "Yes."),
    ]
    assert parse_qa_pairs(text, limit=1) == [("What colour is the square?", "Red.")]
    assert parse_qa_pairs("The model rambles without any format.\nA: orphan answer") == []
    assert parse_qa_pairs("") == []


def test_templates_are_overridable_and_checked(tmp_path):
    shipped = load_templates()
    assert "{captions}" in shipped.summary and "Q: <question>" in shipped.qa
    (tmp_path / "summary.txt").write_text("Clips ({num_clips}):\n{captions}\nSum up {{briefly}}.")
    custom = load_templates(tmp_path)
    assert custom.qa == shipped.qa and custom.caption == shipped.caption
    rendered = custom.render("summary", captions="[0.0s-1.0s] x", num_clips=1, duration=1.0)
    assert rendered == "Clips (1):\n[0.0s-1.0s] x\nSum up {briefly}."
    (tmp_path / "qa.txt").write_text("Questions about {summary} from {speaker}")
    with pytest.raises(ValueError, match=r"unknown fields \['speaker'\]"):
        load_templates(tmp_path)
    (tmp_path / "qa.txt").write_text("Questions about {captions}")
    with pytest.raises(ValueError, match=r"missing fields \['summary'\]"):
        load_templates(tmp_path)
    with pytest.raises(FileNotFoundError):
        load_templates(tmp_path / "absent")
    assert format_captions([(0.0, 2.5), (2.5, 4.0)], ["a  red\nsquare", "dark"]) == (
        "[0.0s-2.5s] a red square\n[2.5s-4.0s] dark"
    )


def test_captioner_specs(tmp_path):
    from megatron_longvila.checkpoint.layout import CheckpointError

    assert parse_captioner_spec("longvila:/checkpoints/run1") == ("longvila", "/checkpoints/run1")
    # A bad checkpoint path fails before the captioner starts a process group.
    with pytest.raises(CheckpointError, match=f"checkpoint path {tmp_path / 'x'} does not exist"):
        load_captioner(f"longvila:{tmp_path / 'x'}")
    with pytest.raises(ValueError, match="device='meta'"):
        load_captioner(f"longvila:{tmp_path}", device="meta")
    with pytest.raises(ValueError, match="hf:FOLDER"):
        load_captioner("/models/some-vlm")
    with pytest.raises(ValueError, match="py:MODULE:FACTORY"):
        BuildConfig(captioner="py:brightness_captioner")
    with pytest.raises(TypeError, match="no caption"):
        load_captioner(f"py:{__name__}:not_a_captioner")
    captioner = load_captioner(f"py:{__name__}:brightness_captioner")
    frames = [torch.full((3, 4, 6), 10, dtype=torch.uint8), torch.zeros(3, 4, 6, dtype=torch.uint8)]
    assert captioner.caption(frames, "prompt", 8) == "a clip of mean brightness 5"


def test_wheel_ships_the_prompt_templates(tmp_path):
    # Reference: the template files in the source tree; the wheel is built from a copy of it.
    repo = Path(__file__).resolve().parents[1]
    source = tmp_path / "source"
    shutil.copytree(
        repo / "megatron_longvila",
        source / "megatron_longvila",
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(repo / name, source / name)
    # The PEP 517 build backend pip would call, without pip's own start-up.
    build_wheel = "import sys, setuptools.build_meta as b; b.build_wheel(sys.argv[1])"
    subprocess.run(
        [sys.executable, "-c", build_wheel, str(tmp_path / "dist")],
        cwd=source,
        check=True,
        capture_output=True,
    )
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    templates = repo / "megatron_longvila" / "long_video_sft" / "templates"
    shipped = {p.relative_to(repo).as_posix() for p in templates.glob("*.txt")}
    assert len(shipped) == 3
    assert shipped <= set(zipfile.ZipFile(wheel).namelist())


# ---- the whole build ------------------------------------------------------------------------

FORCED_QA = "Q: How many scenes are there?\nA: Three.\nQ: What moves?\nA: Shapes."
GOOD_VIDEOS = {
    "a/one_cut.mp4": (21,),
    "b/three_cuts.mkv": (10, 27, 41),
    "two_cuts.webm": (17, 40),
    "still.mp4": (),
}
ANNOTATION = AnnotationConfig(
    clips=CLIPS, frames_per_clip=2, caption_tokens=6, summary_tokens=40, qa_tokens=40
)


@functools.cache
def models() -> dict[str, Path]:
    root = scratch_dir() / "lvsft-models"
    return {
        "vlm": save_tiny_vlm(root / "vlm", tiny_tokenizer_dir()),
        "qa_lm": save_tiny_text_model(root / "qa_lm", tiny_tokenizer_dir(), FORCED_QA),
        "babbling_lm": save_tiny_text_model(root / "babbling_lm", tiny_tokenizer_dir()),
    }


def build_config(text_model: str = "qa_lm", workers: int = 0) -> BuildConfig:
    return BuildConfig(
        captioner=f"hf:{models()['vlm']}",
        text_model=str(models()[text_model]),
        annotation=ANNOTATION,
        workers=workers,
        max_shard_bytes=60_000,
        progress=False,
    )


class Counting:
    """A captioner or text generator that records its calls before passing them on."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.calls: list[tuple[str, str]] = []  # (prompt, output)

    def caption(self, frames, prompt, max_new_tokens):
        out = self.inner.caption(frames, prompt, max_new_tokens)
        self.calls.append((prompt, out))
        return out

    def generate(self, prompt, max_new_tokens):
        out = self.inner.generate(prompt, max_new_tokens)
        self.calls.append((prompt, out))
        return out


CRASH_WIDTH = 32


class BrightnessCaptioner:
    """A plug-in captioner: names the clip's mean brightness, and kills its own process (as the
    out-of-memory killer would) when the frames are ``CRASH_WIDTH`` pixels wide."""

    def caption(self, frames, prompt, max_new_tokens):
        if frames[0].shape[-1] == CRASH_WIDTH:
            os._exit(9)
        return f"a clip of mean brightness {torch.stack(frames).float().mean():.0f}"


def brightness_captioner(device, dtype):
    return BrightnessCaptioner()


def not_a_captioner(device, dtype):
    return object()


def counting_annotator(text_model: str = "qa_lm") -> VideoAnnotator:
    captioner = Counting(HFVisionCaptioner(str(models()["vlm"])))
    text = Counting(HFTextGenerator(str(models()[text_model])))
    return VideoAnnotator(captioner, text, load_templates(), ANNOTATION)


@pytest.fixture(scope="module")
def first_build() -> dict:
    """Four good videos and a truncated one, built by two worker processes."""
    root = scratch_dir() / "lvsft-build"
    for relative, cuts in GOOD_VIDEOS.items():
        _scene_video(root / "videos" / relative, cuts, texture=8)
    good = (root / "videos" / "a/one_cut.mp4").read_bytes()
    (root / "videos" / "broken.mp4").write_bytes(good[: len(good) // 2])
    report = build_long_video_sft(
        root / "videos", root / "out", root / "work", build_config(workers=2)
    )
    return {"root": root, "report": report}


def _shard_samples(out_dir: Path) -> dict[str, dict]:
    """key -> parsed .json of every sample in the shards."""
    samples = {}
    for shard in sorted(out_dir.glob("shard-*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                if member.name.endswith(".json"):
                    key = member.name[: -len(".json")]
                    samples[key] = json.loads(tar.extractfile(member).read())
    return samples


def test_build_finds_the_planted_clips_and_writes_loadable_shards(first_build):
    root, report = first_build["root"], first_build["report"]
    assert report.annotated == sorted(GOOD_VIDEOS) and report.cached == []
    assert [f.video for f in report.failed] == ["broken.mp4"]
    assert "VideoDecodeError" in report.failed[0].reason
    assert report.qa_fallbacks == []
    assert json.loads((root / "work" / "report.json").read_text())["failed"][0]["video"] == (
        "broken.mp4"
    )

    samples = _shard_samples(root / "out")
    assert sorted(samples) == sorted(video_key(v) for v in GOOD_VIDEOS)
    for relative, cuts in GOOD_VIDEOS.items():
        sample = samples[video_key(relative)]
        clips = sample["clips"]
        assert len(clips) == _expected_clips(cuts), relative
        assert sample["clip_method"] == ("scenes" if cuts else "fixed")
        for clip, planted in zip(clips[1:], cuts):
            assert 0 <= clip["start_frame"] - planted < STEP
        assert [c["end_frame"] for c in clips[:-1]] == [c["start_frame"] for c in clips[1:]]
        assert all(isinstance(c["caption"], str) for c in clips)
        assert sample["source"] == relative and sample["summary"] == FORCED_QA
        assert sample["conversations"] == [
            {"from": "human", "value": "<video>\nHow many scenes are there?"},
            {"from": "gpt", "value": "Three."},
            {"from": "human", "value": "What moves?"},
            {"from": "gpt", "value": "Shapes."},
        ]

    config = data_config(root / "out", max_seq_length=512, micro_batch_size=1)
    loader = build_train_loader(config, dp_rank=0, dp_size=1)
    keys = [key for batch in loader for row in batch.keys for key in row]
    assert sorted(keys) == sorted(video_key(v) for v in GOOD_VIDEOS)
    assert sum(loader.issue_counts().values()) == 0


def test_restarted_build_skips_finished_videos(first_build, tmp_path):
    # A copy, so this test leaves the first build as it was.
    root = tmp_path
    shutil.copytree(first_build["root"] / "videos", root / "videos")
    shutil.copytree(first_build["root"] / "work", root / "work")
    config = build_config()

    annotator = counting_annotator()
    report = build_long_video_sft(
        root / "videos", root / "out", root / "work", config, annotator=annotator
    )
    assert annotator.captioner.calls == [] and annotator.text_generator.calls == []
    assert report.cached == sorted(GOOD_VIDEOS) and report.annotated == []
    assert [f.video for f in report.failed] == ["broken.mp4"]  # retried, still broken
    assert report.write.samples == len(GOOD_VIDEOS)

    new_cuts = (14, 38)
    _scene_video(root / "videos" / "c" / "new.mp4", new_cuts, texture=8)
    annotator = counting_annotator()
    report = build_long_video_sft(
        root / "videos", root / "out", root / "work", config, annotator=annotator
    )
    assert report.annotated == ["c/new.mp4"] and len(report.cached) == len(GOOD_VIDEOS)
    captions = [out for _, out in annotator.captioner.calls]
    assert len(captions) == len(new_cuts) + 1
    # The prompts come from the shipped templates, filled with this video's numbers/outputs.
    assert "from 0.0s to 1.8s" in annotator.captioner.calls[0][0]
    (summary_prompt, summary), (qa_prompt, qa_text) = annotator.text_generator.calls
    stored = ResultCache(root / "work").load("c/new.mp4")
    clips = stored["clips"]
    assert summary_prompt == load_templates().render(
        "summary",
        captions=format_captions([(c["start_s"], c["end_s"]) for c in clips], captions),
        duration=8.0,
        num_clips=3,
    )
    assert f"Description: {summary}" in qa_prompt and "Write 5 questions" in qa_prompt
    assert stored["summary"] == summary and qa_text == FORCED_QA
    assert [c["caption"] for c in clips] == captions
    assert report.write.samples == len(GOOD_VIDEOS) + 1

    # Other settings make a stored result stale: the video is annotated again.
    other = build_config()
    other.annotation = dataclasses.replace(ANNOTATION, num_questions=2)
    annotator = counting_annotator()
    report = build_long_video_sft(
        root / "videos",
        root / "out",
        root / "work",
        other,
        videos=["c/new.mp4"],
        annotator=annotator,
    )
    assert report.cached == [] and report.annotated == ["c/new.mp4"]
    assert len(annotator.captioner.calls) == len(new_cuts) + 1


def test_unparsable_qa_falls_back_to_the_summary(tmp_path):
    _scene_video(tmp_path / "videos" / "v.mp4", (30,))
    report = build_long_video_sft(
        tmp_path / "videos", tmp_path / "out", tmp_path / "work", build_config("babbling_lm")
    )
    assert report.annotated == ["v.mp4"] and report.failed == []
    assert [f.video for f in report.qa_fallbacks] == ["v.mp4"]
    stored = ResultCache(tmp_path / "work").load("v.mp4")
    assert stored["qa"] == [] and stored["qa_raw"] is not None and stored["qa_error"]
    (sample,) = _shard_samples(tmp_path / "out").values()
    assert sample["conversations"] == [
        {"from": "human", "value": "<video>\n" + ANNOTATION.fallback_question},
        {"from": "gpt", "value": stored["summary"]},
    ]
    assert [Clip(c["start_frame"], c["end_frame"]) for c in sample["clips"]] == [
        Clip(0, 30),
        Clip(30, 64),
    ]


def test_workers_that_cannot_load_the_models_stop_the_build(tmp_path):
    _scene_video(tmp_path / "videos" / "v.mp4", ())
    config = build_config(workers=1)
    config.text_model = str(tmp_path / "empty-model-folder")
    (tmp_path / "empty-model-folder").mkdir()
    with pytest.raises(RuntimeError, match="could not load the models"):
        build_long_video_sft(tmp_path / "videos", tmp_path / "out", tmp_path / "work", config)


def test_a_dying_worker_fails_its_videos_and_the_build_goes_on(tmp_path):
    videos = tmp_path / "videos"
    _scene_video(videos / "crash.mp4", (30,), width=CRASH_WIDTH)
    for name in ("ok1.mp4", "ok2.mp4"):
        _scene_video(videos / name, (30,))
    config = dataclasses.replace(
        build_config(workers=1), captioner=f"py:{__name__}:brightness_captioner"
    )
    report = build_long_video_sft(videos, tmp_path / "out", tmp_path / "work", config)
    # The one worker holds two videos; crash.mp4 kills it with ok1.mp4 queued behind. Both are
    # reported, and a new worker annotates ok2.mp4.
    died = "a worker process died with it"
    assert [(f.video, f.reason) for f in report.failed] == [("crash.mp4", died), ("ok1.mp4", died)]
    assert report.annotated == ["ok2.mp4"]
    (sample,) = _shard_samples(tmp_path / "out").values()
    assert sample["source"] == "ok2.mp4"
    assert all(c["caption"].startswith("a clip of mean brightness") for c in sample["clips"])
    assert json.loads((tmp_path / "work" / "report.json").read_text())["failed"][1] == {
        "video": "ok1.mp4",
        "reason": died,
    }


def _build_tool():
    """tools/build_long_video_sft.py as a module (``tool.main(argv)`` runs the command line)."""
    spec = importlib.util.spec_from_file_location(
        "build_long_video_sft",
        Path(__file__).resolve().parents[1] / "tools/build_long_video_sft.py",
    )
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return tool


def test_command_line_builds_with_a_plugin_captioner(tmp_path, capsys):
    tool = _build_tool()
    _scene_video(tmp_path / "videos" / "v.mp4", (20, 44))
    argv = [str(tmp_path / "videos"), str(tmp_path / "out"), "--workers", "0", "--no-progress"]
    argv += ["--captioner", f"py:{__name__}:brightness_captioner"]
    argv += ["--text-model", str(models()["qa_lm"]), "--num-questions", "1"]
    argv += ["--min-clip-s", "1", "--analysis-fps", "4", "--frames-per-clip", "2"]
    argv += ["--summary-tokens", "40", "--qa-tokens", "40"]
    assert tool.main(argv) == 0
    assert (
        "1 videos: 1 annotated, 0 finished before, 0 failed; 1 samples" in capsys.readouterr().out
    )
    (sample,) = _shard_samples(tmp_path / "out").values()
    assert [(c["start_frame"], c["end_frame"]) for c in sample["clips"]] == [
        (0, 20),
        (20, 44),
        (44, 64),
    ]
    assert sample["conversations"] == [  # --num-questions 1 keeps the first of the two pairs
        {"from": "human", "value": "<video>\nHow many scenes are there?"},
        {"from": "gpt", "value": "Three."},
    ]
    assert (tmp_path / "out.work" / "report.json").is_file()


# ---- a LongVILA checkpoint as captioner -----------------------------------------------------


def save_longvila(root: str, tokenizer_dir: str) -> None:
    from longvila_checkpoints import save_tiny_longvila_checkpoint

    from megatron_longvila.core.parallel_state import MMSPTopology, initialize_mmsp

    initialize_mmsp(MMSPTopology())
    save_tiny_longvila_checkpoint(root, tokenizer_dir)


def longvila_reference_captions(
    root: str, clips: list[tuple[list[bytes], str]], max_new_tokens: int
) -> list[str]:
    """Greedy ``Generator.generate`` of the checkpoint at ``root`` for each (frames as PNG
    files, prompt): the frames take the training pipeline's image path (``decode_image``:
    scaled to the tower, padded), normalized with the SigLIP mean/std the trainer uses."""
    from megatron_longvila.core.parallel_state import MMSPTopology, initialize_mmsp
    from megatron_longvila.data.chat_template import all_template_markers
    from megatron_longvila.data.tokenizer import load_tokenizer
    from megatron_longvila.inference import Generator, load_model_for_inference

    initialize_mmsp(MMSPTopology())
    model, source = load_model_for_inference(root)
    tokenizer = load_tokenizer(source.tokenizer_path, all_template_markers())
    generator = Generator(model, tokenizer, chat_template=source.chat_template)
    vision = model.cfg.vision
    size = vision.image_size
    captions = []
    for pngs, prompt in clips:
        frames = [decode_image(png, size, "pad") for png in pngs]
        video = to_tower_input(frames, size, "pad", vision.image_mean, vision.image_std)
        captions.append(generator.generate(prompt, video, max_new_tokens=max_new_tokens).text)
    return [c.strip() for c in captions]


def _png(frame: torch.Tensor) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(frame.permute(1, 2, 0).numpy()).save(out, format="PNG")
    return out.getvalue()


def _caption_inputs(video: Path, clips: list[dict]) -> list[tuple[list[bytes], str]]:
    """(frames the builder shows the captioner, caption prompt) of each recorded clip."""
    data = video.read_bytes()
    info = probe_video(data)
    size = caption_frame_size(info, ANNOTATION.caption_max_side)
    inputs = []
    for index, recorded in enumerate(clips):
        clip = Clip(recorded["start_frame"], recorded["end_frame"])
        frames = decode_frames(data, clip_frame_indices(clip, ANNOTATION.frames_per_clip), size)
        start, end = clip.seconds(info.fps)
        prompt = load_templates().render(
            "caption",
            start=start,
            end=end,
            duration=info.duration_s,
            index=index,
            num_clips=len(clips),
        )
        inputs.append(([_png(f) for f in frames], prompt))
    return inputs


def build_with_longvila(argv: list[str]) -> int:
    """The command line in a process that already has a one-rank process group (workers=0:
    the captioner initializes the model-parallel layout on it)."""
    return _build_tool().main(argv)


def test_longvila_checkpoint_captions_like_the_generator(tmp_path, rank_pools):
    # Reference: Generator.generate on a separately loaded model, given the same frames and
    # prompts, the frames scaled and normalized by the training pipeline's image path; captions
    # must be equal strings. Under test: the command line with --captioner longvila:ROOT.
    # Video sizes: 42x32 is the tiny tower's (42 px) scale already, 64x48 must be scaled to it.
    pool = rank_pools(1)
    root = tmp_path / "checkpoints"
    pool.run(save_longvila, str(root), str(tiny_tokenizer_dir()))
    videos = {"tower_size.mp4": (42, 32, (30,)), "larger.mp4": (64, 48, (20, 44))}
    for name, (width, height, cuts) in videos.items():
        spec = SyntheticVideoSpec(
            num_frames=FRAMES, width=width, height=height, fps=FPS, texture=8, scene_starts=cuts
        )
        write_synthetic_video(tmp_path / "videos" / name, spec)
    argv = [str(tmp_path / "videos"), str(tmp_path / "out"), "--workers", "0", "--no-progress"]
    argv += ["--captioner", f"longvila:{root}", "--text-model", str(models()["qa_lm"])]
    argv += ["--min-clip-s", "1", "--analysis-fps", "4", "--frames-per-clip", "2"]
    argv += ["--caption-tokens", str(ANNOTATION.caption_tokens)]
    argv += ["--summary-tokens", "40", "--qa-tokens", "40", "--num-questions", "1"]
    assert pool.run(build_with_longvila, argv) == [0]
    report = json.loads((tmp_path / "out.work" / "report.json").read_text())
    assert report["annotated"] == sorted(videos) and report["failed"] == []

    samples = _shard_samples(tmp_path / "out")
    assert sorted(samples) == sorted(video_key(v) for v in videos)
    recorded, inputs = [], []
    for name, (_, _, cuts) in videos.items():
        clips = samples[video_key(name)]["clips"]
        assert len(clips) == len(cuts) + 1, name
        recorded += [c["caption"] for c in clips]
        inputs += _caption_inputs(tmp_path / "videos" / name, clips)
    (reference,) = pool.run(
        longvila_reference_captions, str(root), inputs, ANNOTATION.caption_tokens
    )
    assert recorded == reference
    assert any(reference), "the random model should not end every caption at once"

    config = data_config(tmp_path / "out", max_seq_length=512, micro_batch_size=1)
    loader = build_train_loader(config, dp_rank=0, dp_size=1)
    keys = [key for batch in loader for row in batch.keys for key in row]
    assert sorted(keys) == sorted(video_key(v) for v in videos)
    assert sum(loader.issue_counts().values()) == 0
