"""MM-SP long-video generation with the LongVILA model equals single-process generation.

Reference (independent of the KV-cache code): the same weights at TP = SP = 1 in one process;
for every new token the model's plain forward (``LongVILAModel.forward(return_logits=True)``) is
recomputed over the whole growing sequence — the video prompt plus every token chosen so far —
and the logits at its last position choose the next token (greedy, or the same seeded sampler).

Under test: a checkpoint written by ``CheckpointManager``, loaded by
``load_model_for_inference`` into SP = 4 (2 × 2), SP = 2 (ring, two data-parallel replicas) and
TP = 2 × SP = 2 (Ulysses) on 4 gloo ranks; ``generate_tokens`` prefills a prompt of 412 tokens
(a 96-frame video = 384 visual tokens, 29 text tokens) with 2D attention, each rank caching its
own shard, and decodes with partial attention merged over the ranks.
Tolerance: 1e-5 absolute on every step's logits (fp32); tokens equal; every rank of a layout
produces the same tokens.

Also: sampling (temperature 0.8, top-p 0.9, seed 7) picks the reference's sampled tokens; a stop
token ends generation there; ``score_continuations`` (prompt prefilled once, cache rewound
between continuations) equals the reference log-likelihoods (1e-5); each rank's KV cache,
measured by its allocated bytes, is 1/sp of the single-process cache within one token per layer.
"""

from __future__ import annotations

import tempfile

import pytest
import torch
from uncached_reference import uncached_logits

TOLERANCE = 1e-5
OVERRIDES = {"init_method_std": 0.2}  # sharp attention: a cache or position error shows
FRAMES, TEXT, VIDEO_AT, STEPS = 96, 30, 4, 10
SAMPLED = {"temperature": 0.8, "top_p": 0.9, "seed": 7}
CONTINUATIONS = [[17], [101, 5, 230], [249 - 9, 3]]
LAYOUTS = {  # name: (tp, ulysses, ring)
    "sp4_2x2": (1, 2, 2),
    "sp2_ring_dp2": (1, 1, 2),
    "tp2_sp2_ulysses": (2, 2, 1),
}


def _config():
    from megatron_longvila.models.config import LongVILAConfig

    return LongVILAConfig.preset("tiny")


def _prompt_parts(cfg) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids [TEXT] with the video placeholder at VIDEO_AT, and the video [FRAMES, 3, H, W]."""
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 240, (TEXT,), generator=gen)
    ids[VIDEO_AT] = cfg.video_token_id
    size = cfg.vision.image_size
    return ids, torch.randn(FRAMES, cfg.vision.num_channels, size, size, generator=gen)


def _reference_generation(model, ids, video, params) -> tuple[list[int], torch.Tensor]:
    from megatron_longvila.inference.sampling import choose_next_token

    generator = params.new_generator()
    tokens, logits = [], []
    while len(tokens) < params.max_new_tokens:
        logits.append(
            uncached_logits(
                model, torch.cat([ids, torch.tensor(tokens, dtype=torch.long)]), [video]
            )
        )
        tokens.append(choose_next_token(logits[-1], params, generator))
        if tokens[-1] in params.stop_token_ids:
            break
    return tokens, torch.stack(logits)


def run_reference(root: str) -> dict | None:
    """Save the checkpoint (all ranks), then on rank 0 the uncached reference generations, the
    reference continuation scores and the single-process cache size."""
    from megatron.core import parallel_state

    from megatron_longvila.checkpoint.manager import CheckpointManager
    from megatron_longvila.checkpoint.train_state import model_record
    from megatron_longvila.inference.decoding import MultimodalPrompt, generate_tokens
    from megatron_longvila.inference.sampling import SamplingParams
    from megatron_longvila.models.longvila_step import build_longvila_model

    parallel_state.initialize_model_parallel()
    cfg = _config()
    (model,) = build_longvila_model(cfg, transformer_overrides=OVERRIDES)
    model.eval()
    CheckpointManager(root).save(1, model.sharded_state_dict(), model_record(cfg))
    if torch.distributed.get_rank() != 0:
        return None

    ids, video = _prompt_parts(cfg)
    greedy = _reference_generation(model, ids, video, SamplingParams(max_new_tokens=STEPS))
    sampled = _reference_generation(model, ids, video, SamplingParams(STEPS, **SAMPLED))
    scores = []
    for continuation in CONTINUATIONS:
        logprobs = []
        for i, token in enumerate(continuation):
            prefix = torch.cat([ids, torch.tensor(continuation[:i], dtype=torch.long)])
            logprobs.append(torch.log_softmax(uncached_logits(model, prefix, [video]), -1)[token])
        scores.append(torch.stack(logprobs))
    cached = generate_tokens(
        model, MultimodalPrompt.from_media(ids, [video]), SamplingParams(max_new_tokens=STEPS)
    )
    return {
        "greedy": greedy,
        "sampled": sampled,
        "scores": scores,
        "single_process_cache_bytes": cached.kv_cache_bytes,
        "prompt_length": cached.prompt_length,
    }


def run_layout(tp: int, ulysses: int, ring: int, root: str, stop_token: int) -> dict:
    from megatron_longvila.core.parallel_state import MMSPTopology, initialize_mmsp
    from megatron_longvila.inference.decoding import (
        MultimodalPrompt,
        generate_tokens,
        score_continuations,
    )
    from megatron_longvila.inference.loading import load_model_for_inference
    from megatron_longvila.inference.sampling import SamplingParams

    groups = initialize_mmsp(MMSPTopology(tp=tp, ulysses=ulysses, ring=ring))
    model, source = load_model_for_inference(root)
    ids, video = _prompt_parts(model.cfg)
    prompt = MultimodalPrompt.from_media(ids, [video], groups.sp_size, groups.sp_rank)
    greedy = generate_tokens(model, prompt, SamplingParams(max_new_tokens=STEPS), True)
    sampled = generate_tokens(model, prompt, SamplingParams(STEPS, **SAMPLED))
    stopped = generate_tokens(
        model, prompt, SamplingParams(max_new_tokens=STEPS, stop_token_ids=(stop_token,))
    )
    return {
        "greedy": greedy,
        "sampled": sampled.token_ids,
        "stopped": stopped,
        "scores": score_continuations(model, prompt, CONTINUATIONS),
        "frames_encoded": 0 if prompt.local_frames is None else len(prompt.local_frames),
        "sp": groups.sp_size,
        "checkpoint": source.directory.name,
    }


@pytest.fixture(scope="module")
def reference(rank_pools):
    root = tempfile.mkdtemp(prefix="mlv-generate-")
    return rank_pools(4).run(run_reference, root)[0], root


@pytest.fixture(scope="module")
def layouts(rank_pools, reference):
    ref, root = reference
    stop_token = ref["greedy"][0][3]  # greedy's fourth token: generation must stop there
    return {
        name: rank_pools(4).run(run_layout, *sizes, root, stop_token)
        for name, sizes in LAYOUTS.items()
    }


def test_reference_is_a_long_video_prompt(reference):
    ref, _ = reference
    assert ref["prompt_length"] == TEXT - 1 + FRAMES * 4 == 413
    tokens, logits = ref["greedy"]
    assert len(tokens) == STEPS and logits.shape[0] == STEPS
    assert len(set(tokens)) > 1, "a generation that can differ"


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_greedy_tokens_and_logits_equal_uncached_reference(reference, layouts, layout):
    tokens, logits = reference[0]["greedy"]
    for rank, result in enumerate(layouts[layout]):
        generation = result["greedy"]
        assert result["checkpoint"] == "iter_0000001"
        assert generation.token_ids == tokens, (rank, generation.token_ids, tokens)
        assert generation.finish_reason == "length"
        error = (generation.step_logits - logits).abs().max().item()
        assert error <= TOLERANCE, (layout, rank, error)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_sampling_and_stop_tokens(reference, layouts, layout):
    ref = reference[0]
    sampled, _ = ref["sampled"]
    greedy, _ = ref["greedy"]
    assert sampled != greedy, "temperature 0.8 / top-p 0.9 sampling departs from greedy here"
    for rank, result in enumerate(layouts[layout]):
        assert result["sampled"] == sampled, (rank, result["sampled"], sampled)
        stopped = result["stopped"]
        assert stopped.token_ids == greedy[: greedy.index(greedy[3]) + 1], rank
        assert stopped.finish_reason == "stop"


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_continuation_scores_equal_reference(reference, layouts, layout):
    expected = reference[0]["scores"]
    for rank, result in enumerate(layouts[layout]):
        for got, want in zip(result["scores"], expected):
            assert got.shape == want.shape
            assert (got - want).abs().max().item() <= TOLERANCE, (layout, rank, got, want)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_kv_cache_and_frames_are_split_over_sp(reference, layouts, layout):
    from megatron_longvila.core.sequence_parallel.visual_exchange import frames_per_rank

    cfg = _config()
    ref = reference[0]
    tp = LAYOUTS[layout][0]
    sp = layouts[layout][0]["sp"]
    single = ref["single_process_cache_bytes"]
    # One token's keys and values in one layer on one rank: kv heads / tp × head dim × 2 × fp32.
    token_bytes = cfg.llm.num_kv_heads // tp * cfg.llm.kv_channels * 2 * 4
    assert single == (ref["prompt_length"] + STEPS - 1) * cfg.llm.num_layers * token_bytes * tp
    for rank, result in enumerate(layouts[layout]):
        got = result["greedy"].kv_cache_bytes
        assert abs(got - single / tp / sp) <= cfg.llm.num_layers * token_bytes, (rank, got, single)
        sp_rank = (rank // tp) % sp
        assert result["frames_encoded"] == frames_per_rank(FRAMES, sp)[sp_rank]
