"""Parallel layouts equal the single-rank model on the same weights.

Tensor parallelism: the LLM and the vision tower at TP=2 equal TP=1.

The weights come from transformers models (random, tiny), are converted and loaded at TP=1,
saved with megatron's ``dist_checkpointing`` and loaded at TP=2, where each rank must hold its
slice: whole query groups of the fused QKV, and the matching rows of *both* the gate and the up
half of SwiGLU's ``linear_fc1`` (checked against the HF tensors directly). Reference: the TP=1
run. Tolerance (fp32): 1e-5 absolute on logits, losses and features; on the gradients of
replicated weights (sums over every patch and token, up to ~40 here) 1e-5 times their
largest entry.

Pipeline parallelism: the LLM (tied embeddings) split over 2 stages and run by megatron's own
1F1B schedule equals PP=1: same loss (1e-4 on a sum of 20 token losses) and gradients of each
stage's layer, and the last stage's copy of the tied embedding is the first stage's tensor.
"""

from __future__ import annotations

import os

import torch

from megatron_longvila.models.config import LLMConfig, VisionConfig

LLM_CFG = LLMConfig.preset("tiny", num_layers=2)  # 4 heads in 2 query groups, vocab 250 → 256
VISION_CFG = VisionConfig.preset("tiny", pooling_head=True)


def _hf_weights() -> tuple[dict, dict]:
    from hf_models import hf_causal_lm, hf_siglip

    return hf_causal_lm("qwen2", LLM_CFG).state_dict(), hf_siglip(VISION_CFG).state_dict()


def _inputs():
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(0, LLM_CFG.vocab_size, (2, 10), generator=gen)
    labels = torch.randint(0, LLM_CFG.vocab_size, (2, 10), generator=gen)
    positions = torch.arange(10).expand(2, 10)
    pixels = torch.randn(3, 3, VISION_CFG.image_size, VISION_CFG.image_size, generator=gen)
    feature_weights = torch.randn(3, VISION_CFG.num_patches, VISION_CFG.hidden_size, generator=gen)
    return ids, labels, positions, pixels, feature_weights


def _outputs(llm, vision) -> dict[str, torch.Tensor]:
    ids, labels, positions, pixels, feature_weights = _inputs()
    llm.zero_grad()
    vision.zero_grad()
    logits = llm(ids, positions).detach()
    losses = llm(ids, positions, labels=labels)
    features = vision(pixels)
    (losses.sum() + (features * feature_weights).sum()).backward()
    _sum_sequence_parallel_grads(llm, vision)
    return {
        "logits": logits,
        "losses": losses.detach(),
        "features": features.detach(),
        "llm_norm_grad": llm.decoder.final_layernorm.weight.grad.clone(),
        "patch_grad": vision.patch_embedding.weight.grad.clone(),
    }


def _sum_sequence_parallel_grads(*models) -> None:
    """What megatron-core's ``finalize_model_grads`` does for TP sequence parallelism (these
    models run without its DDP wrapper): sum over tp the gradients of parameters marked
    ``sequence_parallel`` — each rank saw only its part of the sequence. Marked: the norms and
    the biases of row-parallel linears (added after the reduce-scatter)."""
    from megatron.core import parallel_state

    group = parallel_state.get_tensor_model_parallel_group()
    for model in models:
        if not model.config.sequence_parallel:
            continue
        for name, param in model.named_parameters():
            if getattr(param, "sequence_parallel", False) and param.grad is not None:
                row_bias = name.endswith(("linear_proj.bias", "linear_fc2.bias"))
                assert "layernorm" in name or row_bias, f"{name} is marked sequence_parallel"
                torch.distributed.all_reduce(param.grad, group=group)


def _expected_local_slices(hf_llm: dict, hf_vision: dict, rank: int, tp: int) -> dict:
    """What rank ``rank`` of ``tp`` must hold, cut from the HF tensors by hand."""
    d = LLM_CFG.kv_channels
    q_per_group = LLM_CFG.num_heads // LLM_CFG.num_kv_heads
    groups = range(rank * LLM_CFG.num_kv_heads // tp, (rank + 1) * LLM_CFG.num_kv_heads // tp)
    attn = "model.layers.1.self_attn."
    qkv = torch.cat(
        [
            torch.cat(
                [
                    hf_llm[attn + "q_proj.weight"][g * q_per_group * d : (g + 1) * q_per_group * d],
                    hf_llm[attn + "k_proj.weight"][g * d : (g + 1) * d],
                    hf_llm[attn + "v_proj.weight"][g * d : (g + 1) * d],
                ]
            )
            for g in groups
        ]
    )
    gate = hf_llm["model.layers.1.mlp.gate_proj.weight"].chunk(tp)[rank]
    up = hf_llm["model.layers.1.mlp.up_proj.weight"].chunk(tp)[rank]
    fc1 = hf_vision["encoder.layers.1.mlp.fc1.weight"].chunk(tp)[rank]
    return {
        "decoder.layers.1.self_attention.linear_qkv.weight": qkv,
        "decoder.layers.1.mlp.linear_fc1.weight": torch.cat([gate, up]),
        "encoder.layers.1.mlp.linear_fc1.weight": fc1,
    }


def _run_layout(tp: int, checkpoint_dir: str) -> dict:
    """TP=1: load the HF weights, save a dist checkpoint. TP>1: load that checkpoint."""
    from megatron.core import dist_checkpointing, parallel_state, tensor_parallel

    from megatron_longvila.convert.hf_mapping import (
        llm_state_from_hf,
        load_full_state,
        vision_state_from_hf,
    )
    from megatron_longvila.core import platform
    from megatron_longvila.models.llm import LanguageModel
    from megatron_longvila.models.vision import VisionTower

    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp)
    tensor_parallel.model_parallel_cuda_manual_seed(1)
    platform.seed_everything(100 + tp)  # a different random start per layout
    llm, vision = LanguageModel(LLM_CFG), VisionTower(VISION_CFG)
    hf_llm, hf_vision = _hf_weights()
    paths = {name: os.path.join(checkpoint_dir, name) for name in ("llm", "vision")}
    result: dict = {}
    if tp == 1:
        load_full_state(llm, llm_state_from_hf(hf_llm, LLM_CFG))
        load_full_state(vision, vision_state_from_hf(hf_vision, VISION_CFG))
        if torch.distributed.get_rank() == 0:
            for path in paths.values():
                os.makedirs(path)
        torch.distributed.barrier()
        dist_checkpointing.save(llm.sharded_state_dict(), paths["llm"])
        dist_checkpointing.save(vision.sharded_state_dict(), paths["vision"])
    else:
        result["unloaded_logits"] = _outputs(llm, vision)["logits"]
        for model, name in ((llm, "llm"), (vision, "vision")):
            model.load_state_dict(dist_checkpointing.load(model.sharded_state_dict(), paths[name]))
        rank = parallel_state.get_tensor_model_parallel_rank()
        local = {**llm.state_dict(), **vision.state_dict()}
        result["slices_ok"] = {
            name: torch.equal(local[name], expected)
            for name, expected in _expected_local_slices(hf_llm, hf_vision, rank, tp).items()
        }
    result.update(_outputs(llm, vision))
    return result


def test_tp2_equals_tp1_for_llm_and_vision(ranks2, tmp_path):
    reference = ranks2.run(_run_layout, 1, str(tmp_path))[0]
    parallel = ranks2.run(_run_layout, 2, str(tmp_path))
    for rank, result in enumerate(parallel):
        assert all(result["slices_ok"].values()), f"rank {rank}: {result['slices_ok']}"
        assert (result["unloaded_logits"] - reference["logits"]).abs().max() > 1e-2, (
            "guard: before loading, the TP=2 model must differ"
        )
        for name in ("logits", "losses", "features", "llm_norm_grad", "patch_grad"):
            diff = (result[name] - reference[name]).abs().max().item()
            scale = max(1.0, reference[name].abs().max().item()) if "grad" in name else 1.0
            assert diff <= 1e-5 * scale, f"rank {rank}: {name} differs from TP=1 by {diff:.2e}"


# ---- pipeline parallel ----------------------------------------------------------------------

TIED_CFG = LLMConfig.preset("tiny", num_layers=2, tie_word_embeddings=True)


def _llm_step(data_iterator, model):
    batch = next(data_iterator)
    output = model(batch["ids"], batch["positions"], labels=batch["labels"])

    def loss_func(losses: torch.Tensor):
        total = losses.sum()
        return total, {"loss": total.detach()}

    return output, loss_func


def _run_pipeline(pp: int, checkpoint_dir: str) -> dict:
    """PP=1: load HF weights (tied embeddings), save. PP=2: load; both run megatron's schedule."""
    from hf_models import hf_causal_lm
    from megatron.core import dist_checkpointing, parallel_state, tensor_parallel
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_longvila.convert.hf_mapping import llm_state_from_hf, load_full_state
    from megatron_longvila.core import platform
    from megatron_longvila.models.llm import LanguageModel

    parallel_state.initialize_model_parallel(pipeline_model_parallel_size=pp)
    tensor_parallel.model_parallel_cuda_manual_seed(1)
    platform.seed_everything(200 + pp)
    model = LanguageModel(
        TIED_CFG,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
    )
    path = os.path.join(checkpoint_dir, "tied_llm")
    if pp == 1:
        hf_state = hf_causal_lm("qwen2", TIED_CFG).state_dict()
        load_full_state(model, llm_state_from_hf(hf_state, TIED_CFG))
        if torch.distributed.get_rank() == 0:
            os.makedirs(path)
        torch.distributed.barrier()
        dist_checkpointing.save(model.sharded_state_dict(), path)
    else:
        model.load_state_dict(dist_checkpointing.load(model.sharded_state_dict(), path))
    ids, labels, positions, _, _ = _inputs()
    batch = {"ids": ids, "labels": labels, "positions": positions}
    reduced = get_forward_backward_func()(
        forward_step_func=_llm_step,
        data_iterator=iter([batch]),
        model=[model],
        num_microbatches=1,
        seq_length=ids.shape[1],
        micro_batch_size=ids.shape[0],
    )
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if "linear_qkv" in n}
    result = {"grads": grads, "loss": reduced[0]["loss"] if reduced else None}
    if parallel_state.is_pipeline_last_stage() and not parallel_state.is_pipeline_first_stage():
        # The last stage's copy of the tied embedding, loaded from the first stage's tensor.
        result["output_weight"] = model.output_layer.weight.detach().clone()
    return result


def test_pp2_equals_pp1_with_tied_embeddings(ranks2, tmp_path):
    from hf_models import hf_causal_lm

    reference = ranks2.run(_run_pipeline, 1, str(tmp_path))[0]
    first, last = ranks2.run(_run_pipeline, 2, str(tmp_path))
    embedding = hf_causal_lm("qwen2", TIED_CFG).state_dict()["model.embed_tokens.weight"]
    assert torch.equal(last["output_weight"][: TIED_CFG.vocab_size], embedding)
    assert first["loss"] is None
    assert abs(last["loss"] - reference["loss"]) <= 1e-4  # a sum of 20 token losses (~8 each)
    # Layer 0 lives on the first stage, layer 1 on the last (each numbered 0 locally).
    pipeline_grads = {
        "decoder.layers.0.self_attention.linear_qkv.weight": first["grads"],
        "decoder.layers.1.self_attention.linear_qkv.weight": last["grads"],
    }
    for name, stage_grads in pipeline_grads.items():
        (local,) = (g for n, g in stage_grads.items() if n.endswith("linear_qkv.weight"))
        diff = (local - reference["grads"][name]).abs().max().item()
        assert diff <= 1e-5 * max(1.0, reference["grads"][name].abs().max().item()), name
