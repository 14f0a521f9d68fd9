"""MM-SP prefill + decode over a sharded KV cache equals attention over the full growing sequence.

Reference: ``torch.nn.functional.scaled_dot_product_attention`` in float64 in one process on the
whole, unsplit sequence: causal over the real prompt tokens for prefill; for decode step ``t`` the
new query over every key so far (prompt + tokens ``0..t``), GQA by repeating kv heads.
Under test: ``prefill_attention`` (zigzag prompt, padded 45 → 48 tokens) then ``N`` steps of
``ShardedKVCache.append`` + ``decode_attention`` on 4 gloo ranks as SP=4 (2×2 ulysses×ring) and
SP=2 (1×2 and 2×1, two replicas), with 2 kv heads and with 1 (replicated for ulysses=2).
Tolerance: 1e-5 absolute (fp32). Also: every rank returns the same decode output bit for bit;
per-rank cache bytes are within one token of ``1/sp`` of the single-process cache (measured
``memory_bytes``); bytes sent per decode step equal ``decode_bytes_per_rank``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

TOLERANCE = 1e-5
BATCH, HEADS, HEAD_DIM, PROMPT, STEPS = 2, 4, 8, 45, 8
SPLITS = [(2, 2), (1, 2), (2, 1)]
CASES = {"gqa2-reserved": (2, True), "gqa1-growing": (1, False)}  # kv heads, reserve max_tokens


def _attention64(q, k, v, causal: bool) -> torch.Tensor:
    """q: [b, sq, hq, d], k/v: [b, sk, hkv, d] -> [b, sq, hq, d], float64 sdpa."""
    repeat = q.shape[2] // k.shape[2]
    out = F.scaled_dot_product_attention(
        q.double().transpose(1, 2),
        k.double().repeat_interleave(repeat, 2).transpose(1, 2),
        v.double().repeat_interleave(repeat, 2).transpose(1, 2),
        is_causal=causal,
    )
    return out.transpose(1, 2)


def run_decode(ulysses: int, ring: int) -> dict:
    """On every rank: prefill and decode errors, decode outputs, cache sizes, bytes per step."""
    from megatron_longvila.core.parallel_state import MMSPTopology, initialize_mmsp
    from megatron_longvila.core.sequence_parallel import comm_stats
    from megatron_longvila.core.sequence_parallel.decode import (
        ShardedKVCache,
        decode_attention,
        prefill_attention,
    )
    from megatron_longvila.core.sequence_parallel.sharding import (
        pad_to_multiple,
        sequence_multiple,
        split_zigzag,
    )

    groups = initialize_mmsp(MMSPTopology(ulysses=ulysses, ring=ring))
    sp, rank = groups.sp_size, groups.sp_rank
    total = PROMPT + STEPS
    results = {}
    for case, (kv_heads, reserve) in CASES.items():
        gen = torch.Generator().manual_seed(kv_heads)
        q = torch.randn(BATCH, total, HEADS, HEAD_DIM, generator=gen)
        k, v = (torch.randn(BATCH, total, kv_heads, HEAD_DIM, generator=gen) for _ in range(2))

        padded = PROMPT + (-PROMPT % sequence_multiple(sp))
        prompt = [split_zigzag(pad_to_multiple(t[:, :PROMPT], padded), sp, rank) for t in (q, k, v)]
        cache = ShardedKVCache(groups, max_tokens=total if reserve else None)
        out = prefill_attention(*prompt, cache, PROMPT)
        expected = _attention64(q[:, :PROMPT], k[:, :PROMPT], v[:, :PROMPT], causal=True)
        real = split_zigzag(torch.arange(padded), sp, rank, dim=0) < PROMPT
        expected = split_zigzag(pad_to_multiple(expected, padded), sp, rank)
        prefill_error = (out - expected)[:, real].abs().max().item()

        decode_errors, outputs, step_bytes = [], [], []
        for t in range(PROMPT, total):
            cache.append(k[:, t : t + 1], v[:, t : t + 1])
            with comm_stats.counting() as sent:
                out = decode_attention(q[:, t : t + 1], cache.keys(), cache.values(), groups)
            expected = _attention64(q[:, t : t + 1], k[:, : t + 1], v[:, : t + 1], causal=False)
            decode_errors.append((out - expected).abs().max().item())
            outputs.append(out)
            step_bytes.append(sent.bytes("sp"))
        results[case] = {
            "prefill_error": prefill_error,
            "decode_errors": decode_errors,
            "outputs": torch.cat(outputs, dim=1),
            "step_bytes": step_bytes,
            "memory_bytes": cache.memory_bytes(),
            "tokens_per_rank": cache.tokens_per_rank,
            "local_length": cache.local_length,
            "length": cache.length,
        }
    return results


@pytest.fixture(scope="module")
def decode_results(rank_pools):
    pool = rank_pools(4)
    return {split: pool.run(run_decode, *split) for split in SPLITS}


_IDS = [f"u{u}xr{r}" for u, r in SPLITS]


@pytest.mark.parametrize("split", SPLITS, ids=_IDS)
@pytest.mark.parametrize("case", list(CASES))
def test_prefill_and_decode_equal_full_attention(decode_results, split, case):
    per_rank = [results[case] for results in decode_results[split]]
    for rank, result in enumerate(per_rank):
        assert result["prefill_error"] <= TOLERANCE, (rank, result["prefill_error"])
        assert max(result["decode_errors"]) <= TOLERANCE, (rank, result["decode_errors"])
        # Every rank merges the same partials in the same order: identical, not merely close.
        assert torch.equal(result["outputs"], per_rank[0]["outputs"]), rank


@pytest.mark.parametrize("split", SPLITS, ids=_IDS)
@pytest.mark.parametrize("case", list(CASES))
def test_cache_is_sharded_and_balanced(decode_results, split, case):
    from megatron_longvila.core.sequence_parallel.decode import decode_bytes_per_rank

    ulysses, ring = split
    sp = ulysses * ring
    kv_heads, reserved = CASES[case]
    total = PROMPT + STEPS
    per_rank = [results[case] for results in decode_results[split]]
    counts = per_rank[0]["tokens_per_rank"]
    assert sum(counts) == total and max(counts) - min(counts) <= 1, counts
    token_bytes = BATCH * kv_heads * HEAD_DIM * 2 * 4  # one token's K and V, fp32
    full_cache = total * token_bytes  # what one process would hold
    for rank, result in enumerate(per_rank):
        assert result["length"] == total and result["tokens_per_rank"] == counts
        assert result["local_length"] == counts[rank % sp]
        if reserved:  # allocated once at the final size: within one token of 1/sp
            assert abs(result["memory_bytes"] - full_cache / sp) <= token_bytes, (
                rank,
                result["memory_bytes"],
                full_cache / sp,
            )
        assert result["step_bytes"] == [decode_bytes_per_rank(BATCH, HEADS, HEAD_DIM, sp)] * STEPS


def test_cache_misuse_is_refused():
    from megatron_longvila.core.sequence_parallel.decode import ShardedKVCache, decode_attention

    cache = ShardedKVCache()
    kv = torch.zeros(1, 1, 2, 8)
    with pytest.raises(RuntimeError, match="before store_prompt"):
        cache.append(kv, kv)
    cache.store_prompt(torch.zeros(1, 4, 2, 8), torch.zeros(1, 4, 2, 8), prompt_length=3)
    assert (cache.length, cache.local_length) == (3, 3)
    with pytest.raises(ValueError, match=r"\[b, 1, hkv, d\]"):
        cache.append(torch.zeros(1, 2, 2, 8), torch.zeros(1, 2, 2, 8))
    with pytest.raises(ValueError, match="one new token"):
        decode_attention(torch.zeros(1, 2, 4, 8), cache.keys(), cache.values())
