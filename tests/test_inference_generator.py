"""``Generator``: chat-templated video questions answered and options scored under MM-SP.

Setup: a tiny LongVILA model (vocabulary of a locally trained tokenizer, weights drawn from one
seed, so every layout holds the same weights — checked), a synthetic 48-frame H.264 video,
2 gloo ranks as SP = 2 (Ulysses) and as SP = 1 (two replicas).
References, computed independently of the Generator and of the KV cache:

* prompt ids: ``tokenize_prompt`` of the user turn ``<video>\\n{question}`` (exact);
* frames: every sampled frame decoded in one call (``decode_frames`` + ``to_tower_input``); the
  ranks' shares, each decoded by seeking on its own rank, concatenate to it (exact);
* answers: greedy tokens (placeholder ids excluded) from the model's plain uncached forward at
  SP = 1 over the whole growing sequence (tokens equal; text = the tokenizer's decoding);
* option scores: sum over the option's tokens of the uncached forward's log-softmax (1e-5, fp32).

Also: a text-only question; a missing video fails on every rank (none waits in a collective);
a tokenizer whose placeholder ids differ from the model's, and an option that encodes to no
tokens, are refused with messages naming them.
"""

from __future__ import annotations

import pytest
import torch
from uncached_reference import uncached_logits

QUESTION = "What number appears in the video?"
FRAMES, NEW_TOKENS = 8, 5
OPTIONS = ["42", "seven", "a red circle"]
TOLERANCE = 1e-5


def _generator(tokenizer_dir: str):
    from megatron_longvila.data.chat_template import all_template_markers
    from megatron_longvila.data.tokenizer import load_tokenizer
    from megatron_longvila.inference import FrameSettings, Generator
    from megatron_longvila.models.config import LLMConfig, LongVILAConfig
    from megatron_longvila.models.longvila_step import build_longvila_model

    tokenizer = load_tokenizer(tokenizer_dir, all_template_markers())
    tiny = LongVILAConfig.preset("tiny")
    cfg = LongVILAConfig(
        vision=tiny.vision,
        llm=LLMConfig.preset("tiny", vocab_size=tokenizer.vocab_size),
        image_token_id=tokenizer.image_id,
        video_token_id=tokenizer.video_id,
    )
    (model,) = build_longvila_model(cfg, transformer_overrides={"init_method_std": 0.2})
    model.eval()
    return Generator(model, tokenizer, frames=FrameSettings(num_frames=FRAMES))


def _all_frames(video: str, image_size: int) -> torch.Tensor:
    """Every sampled frame [FRAMES, 3, size, size], decoded in one call (the reference)."""
    from pathlib import Path

    from megatron_longvila.data.video import decode_frames, probe_video, uniform_frame_indices
    from megatron_longvila.data.vision_transform import scaled_size, to_tower_input
    from megatron_longvila.models.config import VisionConfig

    data = Path(video).read_bytes()
    info = probe_video(data)
    size = scaled_size(info.width, info.height, image_size, "pad")
    frames = decode_frames(data, uniform_frame_indices(info.num_frames, FRAMES), size)
    vision = VisionConfig()  # the SigLIP normalization every preset uses
    return to_tower_input(frames, image_size, "pad", vision.image_mean, vision.image_std)


def _reference(generator, video: str) -> dict:
    """Uncached greedy answers and option scores at SP = 1."""
    from megatron_longvila.data.chat_template import tokenize_prompt

    tokenizer, template = generator.tokenizer, generator.template
    frames = _all_frames(video, generator.model.cfg.vision.image_size)

    def ids_of(text: str) -> torch.Tensor:
        return tokenize_prompt([{"from": "human", "value": text}], tokenizer, template)

    def greedy(ids: torch.Tensor, media: list[torch.Tensor]) -> list[int]:
        tokens: list[int] = []
        while len(tokens) < NEW_TOKENS:
            sequence = torch.cat([ids, torch.tensor(tokens, dtype=torch.long)])
            logits = uncached_logits(generator.model, sequence, media)
            logits[[tokenizer.image_id, tokenizer.video_id]] = float("-inf")  # never generated
            tokens.append(int(logits.argmax()))
            if tokens[-1] == generator.end_of_turn_id:
                break
        return tokens

    video_ids = ids_of(f"<video>\n{QUESTION}")
    scores = []
    for option in OPTIONS:
        option_ids = tokenizer.encode(option)
        total = 0.0
        for i, token in enumerate(option_ids):
            prefix = torch.cat([video_ids, torch.tensor(option_ids[:i], dtype=torch.long)])
            logits = uncached_logits(generator.model, prefix, [frames])
            total += float(torch.log_softmax(logits, -1)[token])
        scores.append(total)
    answer = greedy(video_ids, [frames])
    shown = answer[:-1] if answer[-1] == generator.end_of_turn_id else answer
    return {
        "ids": video_ids,
        "frames": frames,
        "video_tokens": answer,
        "video_text": tokenizer.decode(shown),
        "text_tokens": greedy(ids_of(QUESTION), []),
        "scores": scores,
    }


def answer_at(ulysses: int, tokenizer_dir: str, video: str) -> dict:
    """The Generator's results on this rank with SP = ``ulysses`` (and the reference at SP = 1)."""
    import torch.distributed as dist

    from megatron_longvila.core.parallel_state import MMSPTopology, initialize_mmsp
    from megatron_longvila.data.video import VideoDecodeError

    initialize_mmsp(MMSPTopology(ulysses=ulysses))
    generator = _generator(tokenizer_dir)
    prompt = generator.prompt(QUESTION, video)
    answer = generator.generate(QUESTION, video, max_new_tokens=NEW_TOKENS)
    text_only = generator.generate(QUESTION, max_new_tokens=NEW_TOKENS)
    try:
        generator.generate(QUESTION, video + ".missing")
        missing = "no error"
    except VideoDecodeError as exc:
        missing = str(exc)
    return {
        "weights": sum(float(p.detach().double().sum()) for p in generator.model.parameters()),
        "ids": prompt.input_ids,
        "local_frames": prompt.local_frames,
        "answer": answer,
        "text_only": text_only.token_ids,
        "scores": generator.score_options(QUESTION, OPTIONS, video),
        "missing": missing,
        # SP = 1 runs as two replicas: the first computes the reference.
        "reference": _reference(generator, video)
        if ulysses == 1 and dist.get_rank() == 0
        else None,
    }


@pytest.fixture(scope="module")
def results(tmp_path_factory, rank_pools):
    from megatron_longvila.data.synthetic import (
        SyntheticVideoSpec,
        build_tiny_tokenizer,
        write_synthetic_video,
    )

    tmp = tmp_path_factory.mktemp("generator")
    tokenizer_dir = str(build_tiny_tokenizer(tmp / "tokenizer"))
    spec = SyntheticVideoSpec(num_frames=48, width=64, height=48, needle_text="42")
    video = str(write_synthetic_video(tmp / "clip.mp4", spec).path)
    pool = rank_pools(2)
    single = pool.run(answer_at, 1, tokenizer_dir, video)[0]
    return single, pool.run(answer_at, 2, tokenizer_dir, video), single["reference"]


def test_prompt_ids_and_frame_shares(results):
    single, sharded, reference = results
    assert torch.equal(single["ids"], reference["ids"])
    assert torch.equal(single["local_frames"], reference["frames"])
    shares = [r["local_frames"] for r in sharded]
    assert [len(s) for s in shares] == [FRAMES // 2, FRAMES // 2]
    assert torch.equal(torch.cat(shares), reference["frames"])
    for result in sharded:
        assert torch.equal(result["ids"], reference["ids"])


def test_answers_equal_uncached_reference(results):
    single, sharded, reference = results
    assert len(set(reference["video_tokens"])) > 1, "an answer that can differ"
    for result in [single, *sharded]:
        assert result["weights"] == single["weights"], "every layout holds the same weights"
        answer = result["answer"]
        assert answer.token_ids == reference["video_tokens"]
        assert answer.num_frames == FRAMES
        assert answer.generation.prompt_length == len(reference["ids"]) - 1 + FRAMES * 4
        assert answer.text == reference["video_text"]
        assert result["text_only"] == reference["text_tokens"]


def test_option_scores_equal_uncached_reference(results):
    single, sharded, reference = results
    for result in [single, *sharded]:
        got, want = torch.tensor(result["scores"]), torch.tensor(reference["scores"])
        assert (got - want).abs().max().item() <= TOLERANCE, (got, want)


def test_missing_video_fails_on_every_rank(results):
    _, sharded, _ = results
    for result in sharded:
        message = result["missing"]
        assert "sp rank 0:" in message and "sp rank 1:" in message, message
        assert "clip.mp4.missing" in message, message


def test_bad_tokenizer_and_options_are_refused(tmp_path, ranks2):
    problems = ranks2.run(refusals, str(tmp_path / "tokenizer"))
    assert problems[0]["tokenizer"].startswith("the tokenizer's <image>/<video> ids")
    assert "encode to no tokens" in problems[0]["option"]


def refusals(tokenizer_dir: str) -> dict:
    import dataclasses

    import torch.distributed as dist

    from megatron_longvila.core.parallel_state import MMSPTopology, initialize_mmsp
    from megatron_longvila.data.synthetic import build_tiny_tokenizer
    from megatron_longvila.inference import Generator

    if dist.get_rank() == 0:
        build_tiny_tokenizer(tokenizer_dir)
    dist.barrier()
    initialize_mmsp(MMSPTopology(ulysses=1))
    generator = _generator(tokenizer_dir)
    problems = {}
    model = generator.model
    model.cfg = dataclasses.replace(model.cfg, video_token_id=model.cfg.video_token_id + 1)
    try:
        Generator(model, generator.tokenizer)
    except ValueError as exc:
        problems["tokenizer"] = str(exc)
    try:
        generator.score_options(QUESTION, ["A", ""])
    except ValueError as exc:
        problems["option"] = str(exc)
    return problems
