"""Our LLM equals transformers' Qwen2ForCausalLM / LlamaForCausalLM after weight conversion.

Reference: transformers' own model (eager attention, fp32) with random weights from a tiny
config built here, its weights converted by ``hf_mapping``. Tolerances: logits ≤ 1e-4 absolute;
per-token losses ≤ 1e-4 against ``F.cross_entropy`` of the HF logits; the HF → ours → HF round
trip is bit-identical. Runs on rank 0 of a 2-rank gloo pool (tensor-parallel size 1).
"""

from __future__ import annotations

import pytest
import torch
from hf_models import hf_causal_lm

from megatron_longvila.convert.hf_mapping import llm_config_from_hf, llm_config_to_hf
from megatron_longvila.models.config import LLMConfig

TINY = LLMConfig.preset("tiny", num_layers=2)  # vocab 250, padded to 256; GQA 4 heads / 2 kv

VARIANTS = {
    "qwen2-gqa-bias": ("qwen2", TINY),
    "qwen2-tied": ("qwen2", LLMConfig.preset("tiny", tie_word_embeddings=True, num_kv_heads=1)),
    "llama-gqa": ("llama", LLMConfig.preset("tiny", qkv_bias=False, rope_theta=500000.0)),
    "llama-linear-rope": (
        "llama",
        LLMConfig.preset("tiny", qkv_bias=False, rope_scaling={"kind": "linear", "factor": 2.0}),
    ),
    # original_max_position_embeddings 16 puts the ramp among the frequencies a 24-token row uses
    "llama3-rope": (
        "llama",
        LLMConfig.preset(
            "tiny",
            qkv_bias=False,
            num_kv_heads=4,
            rope_scaling={
                "kind": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16,
            },
        ),
    ),
}


def _our_model(cfg: LLMConfig, hf_state: dict):
    from megatron.core import tensor_parallel

    from megatron_longvila.convert.hf_mapping import llm_state_from_hf, load_full_state
    from megatron_longvila.models.llm import LanguageModel

    tensor_parallel.model_parallel_cuda_manual_seed(1)
    model = LanguageModel(cfg).eval()
    load_full_state(model, llm_state_from_hf(hf_state, cfg))
    return model


def _compare(architecture: str, cfg: LLMConfig) -> dict[str, float] | None:
    """Max abs differences to HF: plain rows, packed rows, shifted and permuted positions."""
    import torch.nn.functional as F
    from megatron.core import parallel_state

    from megatron_longvila.convert.hf_mapping import llm_state_to_hf
    from megatron_longvila.models.llm import causal_segment_mask
    from megatron_longvila.models.rotary import rope_inverse_frequencies

    parallel_state.initialize_model_parallel()
    if torch.distributed.get_rank() != 0:
        return None
    hf = hf_causal_lm(architecture, cfg)
    hf_state = {k: v.clone() for k, v in hf.state_dict().items()}
    ours = _our_model(cfg, hf_state)
    gen = torch.Generator().manual_seed(5)
    diffs = {}
    with torch.no_grad():
        # 1. Two rows, positions 0..s-1; logits and per-token losses.
        ids = torch.randint(0, cfg.vocab_size, (2, 12), generator=gen)
        labels = torch.randint(0, cfg.vocab_size, (2, 12), generator=gen)
        labels[0, :3] = -100
        positions = torch.arange(12).expand(2, 12)
        ref = hf(input_ids=ids).logits
        diffs["logits"] = (ours(ids, positions) - ref).abs().max().item()
        diffs["logit_std"] = ref.std().item()
        ref_loss = F.cross_entropy(ref.transpose(1, 2), labels, reduction="none")
        diffs["loss"] = (ours(ids, positions, labels=labels) - ref_loss).abs().max().item()

        # 2. One row holding two samples (5 + 7 tokens), positions restarting; HF runs each
        #    sample alone.
        a, b = ids[0, :5], ids[1, :7]
        packed = torch.cat([a, b]).unsqueeze(0)
        segments = torch.tensor([[0] * 5 + [1] * 7])
        pos = torch.cat([torch.arange(5), torch.arange(7)]).unsqueeze(0)
        got = ours(packed, pos, attention_mask=causal_segment_mask(segments, pos))
        ref = torch.cat([hf(input_ids=a[None]).logits, hf(input_ids=b[None]).logits], dim=1)
        diffs["packed"] = (got - ref).abs().max().item()

        # 3. Positions 17..40 (a later part of a long sequence), given to HF as position_ids.
        ids = torch.randint(0, cfg.vocab_size, (1, 24), generator=gen)
        pos = torch.arange(17, 41).unsqueeze(0)
        ref = hf(input_ids=ids, position_ids=pos).logits
        diffs["shifted"] = (ours(ids, pos) - ref).abs().max().item()
        if cfg.rope_scaling is not None:
            # Guard: the rows above are long enough for the scaling to matter.
            scaled = ours.inv_freq.clone()
            ours.inv_freq.copy_(rope_inverse_frequencies(cfg.kv_channels, cfg.rope_theta))
            unscaled_diff = (ours(ids, pos) - ref).abs().max().item()
            ours.inv_freq.copy_(scaled)

        # 4. The packed row reordered zigzag-style (tokens carry their positions along): the
        #    output is HF's, reordered the same way.
        order = torch.tensor([0, 1, 2, 9, 10, 11, 3, 4, 5, 6, 7, 8])
        seg_p, pos_p = segments[:, order], torch.cat([torch.arange(5), torch.arange(7)])[None]
        pos_p = pos_p[:, order]
        got = ours(packed[:, order], pos_p, attention_mask=causal_segment_mask(seg_p, pos_p))
        ref = torch.cat([hf(input_ids=a[None]).logits, hf(input_ids=b[None]).logits], dim=1)
        diffs["reordered"] = (got - ref[:, order]).abs().max().item()

    back = llm_state_to_hf(ours.state_dict(), cfg)
    assert sorted(back) == sorted(hf_state), set(back) ^ set(hf_state)
    diffs["round_trip_mismatches"] = sum(not torch.equal(back[k], hf_state[k]) for k in hf_state)
    if cfg.rope_scaling is not None:
        diffs["unscaled_rope"] = unscaled_diff
    return diffs


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_logits_and_losses_equal_transformers(ranks2, variant):
    architecture, cfg = VARIANTS[variant]
    diffs = ranks2.run(_compare, architecture, cfg)[0]
    assert diffs.pop("round_trip_mismatches") == 0, "HF -> ours -> HF must be bit-identical"
    assert diffs.pop("logit_std") > 0.5, "logits must be O(1) for 1e-4 to mean something"
    if "unscaled_rope" in diffs:
        assert diffs.pop("unscaled_rope") > 0.1, "RoPE scaling must change these logits"
    for name, diff in diffs.items():
        assert diff <= 1e-4, f"{variant}: {name} differs from transformers by {diff:.2e}"


def test_config_round_trips_through_transformers():
    for architecture, cfg in VARIANTS.values():
        assert llm_config_from_hf(llm_config_to_hf(cfg, architecture), cfg.vocab_pad_multiple) == (
            cfg
        )


def test_bad_configs_are_refused_by_name():
    with pytest.raises(ValueError, match="Qwen2 always has q/k/v biases"):
        llm_config_to_hf(LLMConfig.preset("tiny", qkv_bias=False), "qwen2")
    from transformers import LlamaConfig

    with pytest.raises(ValueError, match="attention_bias"):
        llm_config_from_hf(LlamaConfig(attention_bias=True))
    with pytest.raises(ValueError, match="RoPE type 'dynamic'"):
        llm_config_from_hf(LlamaConfig(rope_parameters={"rope_type": "dynamic", "factor": 2.0}))
