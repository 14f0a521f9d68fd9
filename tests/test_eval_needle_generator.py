"""The evaluations through the real Generator on 2 gloo ranks: SP = 2 predicts as SP = 1.

Setup: a tiny random LongVILA model (init std 0.2, so option scores differ clearly) whose
vocabulary is a locally trained tokenizer's, saved by ``CheckpointManager`` in the trainer's
layout (model beside optimizer state) with its inference metadata, and loaded back with every
tensor equal; a 48×48 synthetic haystack video.
Reference: the same checkpoint loaded at SP = 1 (each rank a whole model) and wrapped by hand in
``Generator`` + ``GeneratorPredictor``.
Under test: the CLI's own path (``parse_args`` → ``load_predictor`` → ``run_needle``) at SP = 2
(Ulysses over both ranks), which must write the JSON and the heatmap PNG on rank 0 only, choose
the same option in every trial and give the same generated answer (exact-match sweep), with
option log-likelihoods equal to the reference's within 1e-4 (fp32; the sharded prefill merges
attention by log-sum-exp, so only rounding differs). The VideoMME (with and without subtitles)
and captioning CLI paths, given video files, must answer exactly as the SP = 1 reference.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

FRAME_COUNTS, DEPTHS = "4,8", "0,50,100"
TOLERANCE = 1e-4
NEW_TOKENS = 6
OPTIONS = ["A. a red square", "B. a blue circle", "C. two shapes", "D. nothing moves"]
SRT = "1\n00:00:00,000 --> 00:00:02,000\nshapes are moving\n"


def _write_bench(folder: Path) -> None:
    """Two 16-frame videos (one with subtitles), three VideoMME questions, two caption items."""
    from megatron_longvila.data.synthetic import SyntheticVideoSpec, write_synthetic_video

    for i, stem in enumerate(("clip_a", "clip_b")):
        spec = SyntheticVideoSpec(num_frames=16, width=48, height=48, seed=i)
        write_synthetic_video(folder / "videos" / f"{stem}.mp4", spec)
    (folder / "subtitles").mkdir()
    (folder / "subtitles" / "clip_a.srt").write_text(SRT)
    questions = [
        {"videoID": stem, "duration": duration, "question_id": qid, "question": "What moves?"}
        | {"options": OPTIONS, "answer": answer}
        for stem, duration, qid, answer in [
            ("clip_a", "short", "q1", "C"),
            ("clip_a", "short", "q2", "A"),
            ("clip_b", "long", "q3", "B"),
        ]
    ]
    (folder / "questions.json").write_text(json.dumps(questions))
    items = [
        {"id": s, "video": f"videos/{s}.mp4", "caption": "two shapes move"}
        for s in ("clip_a", "clip_b")
    ]
    (folder / "captions.jsonl").write_text("".join(json.dumps(i) + "\n" for i in items))


def _model_config(tokenizer):
    from megatron_longvila.models.config import LLMConfig, LongVILAConfig

    tiny = LongVILAConfig.preset("tiny")
    return LongVILAConfig(
        vision=tiny.vision,
        llm=LLMConfig.preset("tiny", vocab_size=tokenizer.vocab_size),
        image_token_id=tokenizer.image_id,
        video_token_id=tokenizer.video_id,
    )


def _cli_args(root: str, haystack: str, output: Path, scoring: str) -> list[str]:
    args = ["needle", "--checkpoint", root, "--haystack", haystack, "--output", str(output)]
    args += ["--frame-counts", FRAME_COUNTS, "--depths", DEPTHS, "--trials", "1"]
    return args + (["--scoring", scoring] if scoring else [])


def reference_sp1(root: str, tokenizer_dir: str, haystack: str, out_dir: str) -> None:
    """Save the checkpoint, then run both sweeps, VideoMME and captioning at SP = 1 with a
    hand-built predictor."""
    import torch
    from megatron.core import parallel_state

    from megatron_longvila.checkpoint.manager import CheckpointManager
    from megatron_longvila.checkpoint.train_state import model_record
    from megatron_longvila.data.chat_template import all_template_markers
    from megatron_longvila.data.tokenizer import load_tokenizer
    from megatron_longvila.eval.captioning import (
        CaptionSettings,
        load_caption_items,
        run_captioning,
    )
    from megatron_longvila.eval.cli import parse_args
    from megatron_longvila.eval.generator_predictor import GeneratorPredictor
    from megatron_longvila.eval.needle import Haystack, NeedleSettings, run_needle_eval
    from megatron_longvila.eval.videomme import (
        VARIANTS,
        VideoMMESettings,
        load_questions,
        run_videomme,
    )
    from megatron_longvila.inference import Generator, load_model_for_inference
    from megatron_longvila.models.longvila_step import build_longvila_model

    parallel_state.initialize_model_parallel()
    tokenizer = load_tokenizer(tokenizer_dir, all_template_markers())
    cfg = _model_config(tokenizer)
    torch.manual_seed(0)
    (model,) = build_longvila_model(cfg, transformer_overrides={"init_method_std": 0.2})
    # The trainer's layout: the model beside optimizer state with common (non-tensor) entries.
    state = {"model": model.sharded_state_dict(), "optimizer": {"param_groups": [{"lr": 0.1}]}}
    CheckpointManager(root).save(1, state, model_record(cfg, tokenizer_dir, "qwen2"))
    loaded, _ = load_model_for_inference(root)
    saved = model.state_dict()
    for name, value in loaded.state_dict().items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, saved[name]), name
    predictor = GeneratorPredictor(Generator(loaded, tokenizer))
    for scoring in ("options", "exact"):
        args = parse_args(_cli_args(root, haystack, Path(out_dir) / f"sp1_{scoring}.json", scoring))
        settings = NeedleSettings(
            frame_counts=args.frame_counts, depths=args.depths, trials=1, scoring=scoring
        )
        run_needle_eval(predictor, Haystack(haystack), settings, args.output)
    bench = Path(out_dir) / "bench"
    run_videomme(
        predictor,
        load_questions(bench / "questions.json"),
        bench / "videos",
        VideoMMESettings(variants=list(VARIANTS), max_new_tokens=NEW_TOKENS),
        Path(out_dir) / "sp1_videomme.json",
        subtitles=bench / "subtitles",
    )
    settings = CaptionSettings(max_new_tokens=NEW_TOKENS)
    items = load_caption_items(bench / "captions.jsonl")
    run_captioning(predictor, items, settings, Path(out_dir) / "sp1_captions.json")


def cli_sp2(root: str, haystack: str, out_dir: str) -> int:
    """Both sweeps, VideoMME and captioning through the CLI's functions at SP = 2; returns how
    many times this rank wrote a results file."""
    from megatron_longvila.eval import results_file
    from megatron_longvila.eval.cli import COMMANDS, load_predictor, parse_args

    def run(argv: list[str]) -> dict:  # as main does: the inputs first, then the command
        args = parse_args(argv)
        read_inputs, command = COMMANDS[args.command]
        return command(args, read_inputs(args), predictor)

    writes = []
    write = results_file.write_json_atomic
    results_file.write_json_atomic = lambda path, data: (writes.append(path), write(path, data))
    try:
        outputs = {s: Path(out_dir) / f"sp2_{s}.json" for s in ("options", "exact")}
        predictor = load_predictor(parse_args(_cli_args(root, haystack, outputs["options"], "")))
        for scoring, output in outputs.items():
            run(_cli_args(root, haystack, output, scoring))
        bench, out = Path(out_dir) / "bench", Path(out_dir)
        common = ["--checkpoint", root, "--max-new-tokens", str(NEW_TOKENS)]
        videomme = ["videomme", *common, "--output", str(out / "sp2_videomme.json")]
        videomme += ["--questions", str(bench / "questions.json")]
        videomme += ["--videos", str(bench / "videos"), "--subtitles", str(bench / "subtitles")]
        run(videomme)
        caption = ["caption", *common, "--output", str(out / "sp2_captions.json")]
        run([*caption, "--items", str(bench / "captions.jsonl")])
    finally:
        results_file.write_json_atomic = write
    return len(writes)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, rank_pools) -> Path:
    from megatron_longvila.data.synthetic import (
        SyntheticVideoSpec,
        build_tiny_tokenizer,
        write_synthetic_video,
    )

    tmp = tmp_path_factory.mktemp("needle-generator")
    tokenizer_dir = build_tiny_tokenizer(tmp / "tokenizer")
    spec = SyntheticVideoSpec(num_frames=16, width=48, height=48)
    haystack = str(write_synthetic_video(tmp / "haystack.mp4", spec).path)
    root = str(tmp / "checkpoints")
    _write_bench(tmp / "bench")
    pool = rank_pools(2)
    pool.run(reference_sp1, root, str(tokenizer_dir), haystack, str(tmp))
    writes = pool.run(cli_sp2, root, haystack, str(tmp))
    assert writes[0] > 0 and writes[1] == 0, writes  # rank 0 alone writes
    return tmp


def test_sp2_predicts_like_sp1(runs):
    for scoring in ("options", "exact"):
        sp1 = json.loads((runs / f"sp1_{scoring}.json").read_text())
        sp2 = json.loads((runs / f"sp2_{scoring}.json").read_text())
        assert sp1["complete"] and sp2["complete"]
        assert sorted(sp1["records"]) == sorted(sp2["records"]) and len(sp1["records"]) == 6
        for key, ref in sp1["records"].items():
            got = sp2["records"][key]
            assert got["prediction"] == ref["prediction"], key
            if scoring == "options":
                diffs = [abs(a - b) for a, b in zip(got["scores"], ref["scores"])]
                assert max(diffs) <= TOLERANCE, (key, got["scores"], ref["scores"])
                # Scores differ between options by far more than the tolerance: a real choice.
                assert max(ref["scores"]) - min(ref["scores"]) > 100 * TOLERANCE
        assert sp2["summary"]["grid"]["accuracy"] == sp1["summary"]["grid"]["accuracy"]
        assert sp2["settings"]["model"]["layout"] == {"tp": 1, "ulysses": 2, "ring": 1}


def test_json_and_heatmap_written(runs):
    import matplotlib.image

    for scoring in ("options", "exact"):
        image = matplotlib.image.imread(runs / f"sp2_{scoring}.png")
        assert image.ndim == 3 and min(image.shape[:2]) > 50
        report = json.loads((runs / f"sp2_{scoring}.json").read_text())
        assert report["summary"]["grid"]["columns_frames"] == [4, 8]
        assert report["settings"]["model"]["frames"]["resize_mode"] == "pad"
    assert not list(runs.glob(".*.tmp"))  # every write completed its rename


def test_videomme_and_captions_through_the_generator(runs):
    """Files given by path (each rank decodes its own frames): SP = 2 answers as SP = 1."""
    for name in ("videomme", "captions"):
        sp1 = json.loads((runs / f"sp1_{name}.json").read_text())
        sp2 = json.loads((runs / f"sp2_{name}.json").read_text())
        assert sp1["complete"] and sp2["complete"]
        assert sp1["records"].keys() == sp2["records"].keys()
        for key, ref in sp1["records"].items():
            got = sp2["records"][key]
            assert "skipped" not in got, got
            field = "response" if name == "videomme" else "caption"
            assert got[field] == ref[field], key
            assert isinstance(got[field], str)
        if name == "videomme":
            assert len(sp2["records"]) == 6  # 3 questions × with/without subtitles
            assert sp2["records"]["q1/with_subtitles"]["subtitle_cues"] == 1
            assert sp2["records"]["q3/with_subtitles"]["subtitle_cues"] == 0  # no .srt
            summary = sp2["summary"]["with_subtitles"]
            assert summary["by_duration"].keys() == {"short", "long"}
        else:
            assert set(sp2["summary"]["metrics"]) == {"bleu4", "rouge_l", "cider_d"}


def open_results(path: str, settings: dict) -> str:
    """What this rank sees when it opens ``path`` for resuming: its records, or the error."""
    from megatron_longvila.eval.results_file import ResultsFile

    try:
        return ",".join(sorted(ResultsFile(path, "needle", settings).records))
    except ValueError as exc:
        return f"error: {exc}"


def test_every_rank_resumes_alike(tmp_path, rank_pools):
    """Rank 0 alone reads the file; the records reach every rank, and a refusal stops every
    rank (none is left waiting for records)."""
    path = tmp_path / "r.json"
    data = {"eval": "needle", "settings": {"x": 1}, "records": {"a": {}, "b": {}}}
    path.write_text(json.dumps(data))
    pool = rank_pools(2)
    assert pool.run(open_results, str(path), {"x": 1}) == ["a,b", "a,b"]
    refused = pool.run(open_results, str(path), {"x": 2})
    assert all(r.startswith("error:") and "x: 1 -> 2" in r for r in refused), refused
