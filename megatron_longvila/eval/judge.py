"""A language model as the judge of a caption against its reference, on a 0–5 rubric.

LongVILA scores long-video captions with an LLM judge on three aspects, each an integer from 0
to 5: correctness (are the stated facts right), detail (how much of the video is covered) and
context (is the course of events understood). :class:`HFCausalLMJudge` asks a local Hugging Face
causal LM each aspect's question and reads its verdict from the next-token distribution over the
digits 0–5 (the most likely digit; the expectation is recorded too), so even a small judge that
would ramble when sampling gives a score. Nothing is downloaded.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

ASPECTS = {
    "correctness": (
        "Correctness: are the objects, people, actions and events the caption states present "
        "in the reference, without contradictions or invented content? 0 = wholly wrong or "
        "unrelated, 5 = every statement agrees with the reference."
    ),
    "detail": (
        "Detail: how much of the reference's content (objects, actions, settings, changes over "
        "time) does the caption cover? 0 = nothing, 5 = all of it."
    ),
    "context": (
        "Context: does the caption convey the video's overall course of events in the right "
        "order? 0 = not at all, 5 = completely."
    ),
}


@dataclass(frozen=True)
class Verdict:
    score: int  # 0..5
    expected: float  # Σ p(d)·d over the digits 0..5, renormalized


class Judge(Protocol):
    def judge(self, caption: str, reference: str, aspect: str) -> Verdict: ...

    def describe(self) -> dict: ...


def judge_prompt(caption: str, reference: str, aspect: str) -> str:
    return (
        "You grade a video caption against a reference description of the same video.\n"
        f"{ASPECTS[aspect]}\n\n"
        f"Reference: {reference}\n"
        f"Caption: {caption}\n\n"
        "Reply with one integer from 0 to 5.\nScore:"
    )


class HFCausalLMJudge:
    """A judge from a local Hugging Face causal-LM folder (config, weights, tokenizer)."""

    def __init__(self, path: str | Path, dtype: torch.dtype = torch.float32) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.path = Path(path)
        if not self.path.is_dir():
            raise FileNotFoundError(f"caption judge folder {self.path} does not exist")
        if not (self.path / "config.json").is_file():
            raise FileNotFoundError(
                f"caption judge folder {self.path} has no config.json: not a Hugging Face model"
            )
        self.tokenizer = AutoTokenizer.from_pretrained(self.path, local_files_only=True)
        self.model = AutoModelForCausalLM.from_pretrained(
            self.path, local_files_only=True, dtype=dtype
        ).eval()
        self.digit_ids = []
        for digit in "012345":
            ids = self.tokenizer.encode(f" {digit}", add_special_tokens=False)[-1:]
            plain = self.tokenizer.encode(digit, add_special_tokens=False)
            # Prefer the bare digit; " 5" may be one token or a space then "5".
            self.digit_ids.append(plain[0] if len(plain) == 1 else ids[0])
        if len(set(self.digit_ids)) != 6:
            raise ValueError("the judge's tokenizer does not give the digits 0-5 distinct tokens")

    def judge(self, caption: str, reference: str, aspect: str) -> Verdict:
        prompt = judge_prompt(caption, reference, aspect)
        if getattr(self.tokenizer, "chat_template", None):
            prompt = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
            )
        ids = self.tokenizer(prompt, return_tensors="pt", add_special_tokens=True).input_ids
        with torch.no_grad():
            logits = self.model(input_ids=ids).logits[0, -1].float()
        probs = torch.softmax(logits[self.digit_ids], dim=-1)
        expected = float((probs * torch.arange(6, dtype=probs.dtype)).sum())
        return Verdict(score=int(probs.argmax()), expected=expected)

    def describe(self) -> dict:
        return {"kind": "hf_causal_lm", "path": str(self.path), "aspects": sorted(ASPECTS)}
