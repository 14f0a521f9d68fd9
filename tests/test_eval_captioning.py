"""Captioning score: text metrics against hand-computed values, the harness with a scripted
captioner and judge, and the Hugging Face judge on a tiny local model.

References: BLEU-4 / ROUGE-L of "the cat sat on the mat" vs "the cat sat on a mat" worked out
by hand (n-gram matches 5/6, 3/5, 2/4, 1/3, equal lengths; LCS 5 of 6); CIDEr-D is 10 for a
caption equal to its reference and 0 for one sharing no word. Exact to 1e-12.
"""

from __future__ import annotations

import json
import math

import pytest

from megatron_longvila.data.synthetic import SyntheticVideoSpec, write_synthetic_video
from megatron_longvila.eval.captioning import CaptionSettings, load_caption_items, run_captioning
from megatron_longvila.eval.judge import ASPECTS, HFCausalLMJudge, Verdict
from megatron_longvila.eval.text_metrics import bleu4, cider_d, rouge_l

CANDIDATE, REFERENCE = "The cat sat on the mat.", "the cat sat on a mat ."


def test_bleu_and_rouge_by_hand():
    # 7 tokens each with the full stop: matches 6/7, 4/6, 2/5, 1/4.
    expected = (6 / 7 * 4 / 6 * 2 / 5 * 1 / 4) ** 0.25
    assert bleu4([CANDIDATE], [[REFERENCE]]) == pytest.approx(expected, abs=1e-12)
    assert bleu4(["the cat sat on the mat"], [["the cat sat on a mat"]]) == pytest.approx(
        (5 / 6 * 3 / 5 * 2 / 4 * 1 / 3) ** 0.25, abs=1e-12
    )
    # Brevity: a 4-token candidate against a 6-token reference, all n-grams matching.
    assert bleu4(["the cat sat on"], [["the cat sat on a mat"]]) == pytest.approx(
        math.exp(1 - 6 / 4), abs=1e-12
    )
    assert rouge_l(["the cat sat on the mat"], [["the cat sat on a mat"]]) == pytest.approx(5 / 6)
    # The best of several references counts.
    assert rouge_l(["a dog"], [["a cat", "a dog"]]) == pytest.approx(1.0)


def test_cider_d_extremes():
    refs = [["a red square moves left"], ["two blue circles bounce"], ["a green shape rests"]]
    cands = ["a red square moves left", "two blue circles bounce", "nothing here at all"]
    per_item = [cider_d([c], [r]) for c, r in zip(cands, refs)]  # IDF of one document is 0
    assert per_item == [0.0, 0.0, 0.0]
    both = cider_d(cands[:2], refs[:2])
    assert both == pytest.approx(10.0, abs=1e-9)
    assert cider_d(cands, refs) == pytest.approx(10.0 * 2 / 3, abs=1e-9)
    with pytest.raises(ValueError, match="2 candidates but 3 reference sets"):
        cider_d(cands[:2], refs)


class ScriptedCaptioner:
    def __init__(self, captions: dict[str, str]) -> None:
        self.captions = captions

    def answer(self, question, video, *, num_frames=None, max_new_tokens=64) -> str:
        assert question == "Describe the video." and num_frames == 4
        return self.captions[video.stem]

    def score_options(self, *args, **kwargs):
        raise AssertionError("captioning does not score options")

    def describe(self) -> dict:
        return {"kind": "scripted"}


class WordOverlapJudge:
    """Scores 5 when the caption equals the reference, else 1; 'detail' always 3."""

    def judge(self, caption, reference, aspect) -> Verdict:
        score = 3 if aspect == "detail" else (5 if caption == reference else 1)
        return Verdict(score=score, expected=float(score))

    def describe(self) -> dict:
        return {"kind": "word-overlap"}


def test_captioning_run_with_judge(tmp_path):
    items = []
    for i in range(3):
        name = f"clip{i}"
        write_synthetic_video(tmp_path / f"{name}.mp4", SyntheticVideoSpec(num_frames=8, seed=i))
        items.append({"id": name, "video": f"{name}.mp4", "caption": f"reference {i}"})
    items.append({"id": "gone", "video": "gone.mp4", "caption": "never seen"})
    (tmp_path / "items.jsonl").write_text("".join(json.dumps(i) + "\n" for i in items))
    loaded = load_caption_items(tmp_path / "items.jsonl")
    captioner = ScriptedCaptioner({"clip0": "reference 0", "clip1": "reference 1", "clip2": "x"})
    settings = CaptionSettings(prompt="Describe the video.", num_frames=4)
    summary = run_captioning(captioner, loaded, settings, tmp_path / "c.json", WordOverlapJudge())
    assert (summary["captions"], summary["skipped"]) == (3, 1)
    # Per item: mean over (correctness, detail, context) = (5+3+5)/3, (5+3+5)/3, (1+3+1)/3.
    assert summary["judge"]["score"] == pytest.approx((13 / 3 + 13 / 3 + 5 / 3) / 3)
    assert summary["judge"]["by_aspect"] == {
        "correctness": 11 / 3,
        "detail": 3.0,
        "context": 11 / 3,
    }
    expected = bleu4(
        ["reference 0", "reference 1", "x"], [["reference 0"], ["reference 1"], ["reference 2"]]
    )
    assert summary["metrics"]["bleu4"] == pytest.approx(expected)
    report = json.loads((tmp_path / "c.json").read_text())
    assert report["settings"]["judge"] == {"kind": "word-overlap"}
    assert sorted(report["records"]["clip2"]["judge"]) == sorted(ASPECTS)


def test_hf_judge_on_a_tiny_local_model(tmp_path):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from megatron_longvila.data.synthetic import build_tiny_tokenizer

    folder = build_tiny_tokenizer(tmp_path / "judge")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    judge = HFCausalLMJudge(folder)
    verdict = judge.judge("a red square", "a red square moves", "correctness")
    assert verdict.score in range(6) and 0.0 <= verdict.expected <= 5.0
    with pytest.raises(FileNotFoundError, match=r"caption judge folder .*missing does not exist"):
        HFCausalLMJudge(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match=r"has no config\.json"):
        HFCausalLMJudge(tmp_path)


def test_cli_names_a_missing_judge_before_loading(tmp_path):
    from megatron_longvila.eval.cli import check_inputs, parse_args

    items = tmp_path / "items.jsonl"
    items.write_text("")
    args = ["caption", "--checkpoint", str(tmp_path), "--output", str(tmp_path / "c.json")]
    args += ["--items", str(items), "--judge", str(tmp_path / "no-judge")]
    with pytest.raises(FileNotFoundError, match=r"caption judge folder .*no-judge does not exist"):
        check_inputs(parse_args(args))
