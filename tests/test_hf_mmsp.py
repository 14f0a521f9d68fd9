"""A transformers Qwen2ForCausalLM with MM-SP attention equals the untouched model on one process.

Reference: the same ``Qwen2ForCausalLM`` (same seed, tiny random config made here) with
transformers' ``sdpa`` attention on the whole, unsplit sequence in one process; its loss is
transformers' own (``labels=`` → mean token loss), packed rows are given to it as restarting
position ids (transformers then masks across samples itself), gradients by autograd.
Under test: ``enable_mmsp`` + ``attn_implementation="mmsp"`` on 4 gloo ranks as SP=4 (2×2
ulysses×ring) and SP=2 (2×1 and 1×2, two data-parallel replicas), inputs from
``MMSPSharding.shard_batch`` (zigzag, padded 38 → 40 tokens), loss from ``causal_lm_loss``,
gradients summed over sp by ``sum_gradients``.
Tolerance: 1e-5 absolute on the loss and on every parameter gradient (fp32).
"""

from __future__ import annotations

import pytest
import torch

TOLERANCE = 1e-5
BATCH, SEQ, VOCAB = 2, 38, 64
PACKED = (21, 17)  # two samples in each row, positions restarting at the second
SPLITS = [(2, 2), (2, 1), (1, 2)]
CASES = {  # name: (kv heads, packed)
    "plain-gqa2": (2, False),
    "packed-gqa1": (1, True),  # one kv head, replicated for ulysses=2
}


def _model(kv_heads: int, attn_implementation: str):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        max_position_embeddings=128,
        tie_word_embeddings=False,
        initializer_range=0.2,  # logits O(1), attention far from uniform
    )
    torch.manual_seed(0)
    return Qwen2ForCausalLM._from_config(config, attn_implementation=attn_implementation)


def _batch(packed: bool) -> dict[str, torch.Tensor | None]:
    """The same global batch on every rank; labels in transformers' convention (unshifted)."""
    gen = torch.Generator().manual_seed(3)
    input_ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=gen)
    labels = input_ids.clone()
    position_ids = None
    if packed:
        position_ids = torch.cat([torch.arange(n) for n in PACKED]).expand(BATCH, SEQ)
        labels[:, PACKED[0]] = -100  # the first sample's last token must not predict the second's
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}


def _reference(case: str) -> tuple[float, dict[str, torch.Tensor]]:
    kv_heads, packed = CASES[case]
    model = _model(kv_heads, "sdpa")
    loss = model(**_batch(packed), use_cache=False).loss
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}


def run_mmsp(ulysses: int, ring: int) -> dict:
    """On every rank: loss and summed gradients of each case; kv repeated vs unrepeated."""
    from transformers import AttentionInterface

    from megatron_longvila.core.parallel_state import MMSPTopology, initialize_mmsp
    from megatron_longvila.hf import enable_mmsp

    groups = initialize_mmsp(MMSPTopology(ulysses=ulysses, ring=ring))
    sharding = enable_mmsp(groups)
    results = {}
    for case, (kv_heads, packed) in CASES.items():
        model = _model(kv_heads, sharding.attn_implementation)
        batch = sharding.shard_batch(**_batch(packed))
        logits = model(**batch.model_inputs()).logits
        loss = sharding.causal_lm_loss(logits, batch)
        loss.backward()
        sharding.sum_gradients(model)
        results[case] = {
            "loss": loss.item(),
            "grads": {n: p.grad for n, p in model.named_parameters()},
            "segments": batch.segment_ids is not None,
        }

    # transformers' modules pass kv heads unrepeated; some pass them repeated: same result.
    gen = torch.Generator().manual_seed(groups.sp_rank)
    q = torch.randn(BATCH, 4, 10, 8, generator=gen)
    k, v = (torch.randn(BATCH, 2, 10, 8, generator=gen) for _ in range(2))
    module = torch.nn.Module()
    module.is_causal = True
    attend = AttentionInterface()[sharding.attn_implementation]
    out, _ = attend(module, q, k, v, None, scaling=0.3)
    repeated, _ = attend(
        module, q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), None, scaling=0.3
    )
    results["kv_repeat_error"] = (out - repeated).abs().max().item()
    return results


@pytest.fixture(scope="module")
def references():
    return {case: _reference(case) for case in CASES}


@pytest.fixture(scope="module")
def mmsp_results(rank_pools):
    pool = rank_pools(4)
    return {split: pool.run(run_mmsp, *split) for split in SPLITS}


@pytest.mark.parametrize("split", SPLITS, ids=[f"u{u}xr{r}" for u, r in SPLITS])
@pytest.mark.parametrize("case", list(CASES))
def test_loss_and_gradients_equal_single_process(mmsp_results, references, split, case):
    ref_loss, ref_grads = references[case]
    for rank, results in enumerate(mmsp_results[split]):
        result = results[case]
        assert result["segments"] == CASES[case][1]
        assert abs(result["loss"] - ref_loss) <= TOLERANCE, (rank, result["loss"], ref_loss)
        assert result["grads"].keys() == ref_grads.keys()
        for name, grad in result["grads"].items():
            error = (grad - ref_grads[name]).abs().max().item()
            assert error <= TOLERANCE, (rank, name, error)


@pytest.mark.parametrize("split", SPLITS, ids=[f"u{u}xr{r}" for u, r in SPLITS])
def test_repeated_kv_heads_give_the_same_attention(mmsp_results, split):
    for results in mmsp_results[split]:
        assert results["kv_repeat_error"] <= 1e-6


def test_padding_mask_and_dropout_are_refused():
    """One process (groups of one): a padding mask transformers would drop, and dropout, fail."""
    from megatron_longvila.hf import enable_mmsp

    sharding = enable_mmsp()
    model = _model(2, sharding.attn_implementation)
    batch = sharding.shard_batch(**_batch(packed=False))
    mask = torch.ones(BATCH, batch.input_ids.shape[1], dtype=torch.long)
    mask[0, :3] = 0
    with pytest.raises(ValueError, match="3 of 76 positions masked"):
        model(input_ids=batch.input_ids, attention_mask=mask)
    model(input_ids=batch.input_ids, attention_mask=torch.ones_like(mask))  # all ones: fine
    model.config.attention_dropout = 0.1
    for layer in model.model.layers:
        layer.self_attn.attention_dropout = 0.1
    with pytest.raises(ValueError, match=r"dropout=0\.1"):
        model.train()(input_ids=batch.input_ids)


def test_shard_batch_shifts_labels_before_splitting():
    """Single process: the labels are the next token of the same sample, ignored at sample ends
    and at padding; position ids restart with the samples; padding to 2·sp."""
    from megatron_longvila.core.parallel_state import MMSPGroups
    from megatron_longvila.hf import IGNORE_INDEX, MMSPSharding

    data = _batch(packed=True)
    batch = MMSPSharding(MMSPGroups()).shard_batch(**data)
    ids = data["input_ids"]
    expected = torch.cat([ids[:, 1:], torch.full((BATCH, 1), IGNORE_INDEX)], dim=1)
    expected[:, PACKED[0] - 1] = IGNORE_INDEX
    assert torch.equal(batch.labels, expected)
    assert batch.num_valid_tokens == BATCH * (SEQ - 2)
    assert torch.equal(batch.segment_ids[0], torch.tensor([0] * 21 + [1] * 17))


# ---- greedy generation with the KV cache sharded over sp ------------------------------------
# Reference: transformers' own ``generate`` (greedy, sdpa, DynamicCache) in one process.
# Tolerance: the same tokens; 1e-5 absolute on every step's logits.
PROMPT, NEW_TOKENS = 45, 6


def _prompt() -> torch.Tensor:
    return torch.randint(0, VOCAB, (BATCH, PROMPT), generator=torch.Generator().manual_seed(5))


@pytest.fixture(scope="module")
def reference_generation():
    model = _model(2, "sdpa").eval()
    model.generation_config.eos_token_id = None  # run all steps, as greedy_generate does
    out = model.generate(
        _prompt(),
        max_new_tokens=NEW_TOKENS,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
    )
    cache = out.cache if hasattr(out, "cache") else out.past_key_values
    cache_bytes = sum(
        t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values)
    )
    return out.sequences, torch.stack(out.logits, dim=1), cache_bytes


def run_generate(ulysses: int, ring: int) -> dict:
    from megatron_longvila.core.parallel_state import MMSPTopology, initialize_mmsp
    from megatron_longvila.hf import enable_mmsp
    from megatron_longvila.hf.generation import greedy_generate

    groups = initialize_mmsp(MMSPTopology(ulysses=ulysses, ring=ring))
    sharding = enable_mmsp(groups)
    model = _model(2, sharding.attn_implementation).eval()
    generation = greedy_generate(model, sharding, _prompt(), NEW_TOKENS)
    return {
        "tokens": generation.tokens,
        "logits": generation.logits,
        "cache_bytes": generation.cache.memory_bytes(),
    }


@pytest.fixture(scope="module")
def generation_results(rank_pools):
    pool = rank_pools(4)
    return {split: pool.run(run_generate, *split) for split in SPLITS}


@pytest.mark.parametrize("split", SPLITS, ids=[f"u{u}xr{r}" for u, r in SPLITS])
def test_greedy_generation_equals_transformers_generate(
    generation_results, reference_generation, split
):
    ref_tokens, ref_logits, ref_cache_bytes = reference_generation
    sp = split[0] * split[1]
    # One token's K and V in every layer (2 layers, 2 kv heads of 8), fp32.
    token_bytes = BATCH * 2 * 2 * 8 * 2 * 4
    for rank, result in enumerate(generation_results[split]):
        assert torch.equal(result["tokens"], ref_tokens), rank
        error = (result["logits"] - ref_logits).abs().max().item()
        assert error <= TOLERANCE, (rank, error)
        # transformers' cache holds every token on one process; each rank ~1/sp of it.
        assert abs(result["cache_bytes"] - ref_cache_bytes / sp) <= token_bytes, (
            rank,
            result["cache_bytes"],
            ref_cache_bytes / sp,
        )
