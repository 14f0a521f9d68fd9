"""The LongVILA model with two-stage MM-SP sharding equals the unsharded model.

Reference (independent of the code under test): on one rank (TP = SP = PP = 1), every frame of
the batch through the same vision tower and projector at once; a Python loop builds each row's
multimodal sequence (placeholders replaced by their frames' tokens, labels shifted per sample,
positions restarting per sample); an LLM with megatron's own ``DotProductAttention`` and a dense
packed-causal mask (``causal_segment_mask``) gives token losses; loss = sum over valid tokens of
both micro-batches / their count; plain autograd gradients.

Under test: ``build_longvila_model`` + ``forward_step`` run by megatron's
``get_forward_backward_func`` (no pipelining, or 1F1B with PP = 2) under megatron DDP
(``calculate_per_token_loss``, gradients finished by ``finalize_model_grads``), weights moved from
the reference layout by ``dist_checkpointing``, for SP = 2 (Ulysses) and SP = 2 (ring) with two
data-parallel replicas (one micro-batch each), SP = 4 (2 × 2), TP = 2 × SP = 2 and PP = 2 ×
SP = 2 (two micro-batches each), TP = 2 with two replicas and TP = 2 × PP = 2. Every TP = 2
layout runs Megatron's TP sequence parallelism (norm and residual activations split over tp, the
norms' gradients summed over tp by ``finalize_model_grads``). Gradients are gathered to full
tensors (tensor-parallel shards concatenated, pipeline stages' layers renumbered globally).
Tolerance: 1e-5 absolute on the loss and on every trainable parameter's gradient (fp32).

Also checked in the same runs: each rank's vision tower encodes exactly its stage-1 share of the
frames, and the visual-token exchange sends exactly the tokens whose positions another rank holds
(forward) and their gradients back (backward): bytes = tokens × hidden × 4.
"""

from __future__ import annotations

import tempfile
from dataclasses import replace

import pytest
import torch
from longvila_batches import CFG, micro_batches, reference_rows, uint8_media
from longvila_layouts import OVERRIDES, run_layout

from megatron_longvila.core.sequence_parallel.sharding import shard_token_indices
from megatron_longvila.core.sequence_parallel.visual_exchange import frames_per_rank
from megatron_longvila.data.batch import IGNORE_INDEX, PAD_SEGMENT
from megatron_longvila.models.config import MemoryConfig

TOLERANCE = 1e-5
# The reference keeps every tensor for the backward; the layouts run the model's default memory
# options (chunked loss, recomputed activations and norms), so they are checked here as well.
PLAIN_CFG = replace(CFG, memory=MemoryConfig.keep_everything())
LAYOUTS = {  # name: (tp, ulysses, ring, pp); four ranks each
    "sp2_ulysses_dp2": (1, 2, 1, 1),
    "sp2_ring_dp2": (1, 1, 2, 1),
    "sp4_2x2": (1, 2, 2, 1),
    "tp2_sp2": (2, 2, 1, 1),
    "pp2_sp2": (1, 1, 2, 2),
    "tp2_dp2": (2, 1, 1, 1),
    "tp2_pp2": (2, 1, 1, 2),
}


# ---- the reference ----------------------------------------------------------------------------


def _reference_loss_sum(model, llm, batch, cfg):
    """(sum of valid token losses, their count) of one batch through the reference path."""
    from megatron_longvila.models.llm import causal_segment_mask

    features = model.mm_projector(model.vision_tower(torch.cat(batch.media)))
    visual = features.reshape(-1, cfg.llm.hidden_size)  # [all visual tokens, h], frame order
    text = llm.embed(batch.input_ids)  # [s, b, h]
    rows = reference_rows(batch, cfg)
    length = max(len(row["tokens"]) for row in rows)
    b = batch.batch_size
    labels = torch.full((b, length), IGNORE_INDEX)
    positions = torch.zeros(b, length, dtype=torch.long)
    segments = torch.full((b, length), PAD_SEGMENT)
    columns = []
    for r, row in enumerate(rows):
        n = len(row["tokens"])
        labels[r, :n] = torch.tensor(row["labels"])
        positions[r, :n] = torch.tensor(row["positions"])
        segments[r, :n] = torch.tensor(row["segments"])
        pieces = [text[i, r] if kind == "text" else visual[i] for kind, i in row["tokens"]]
        pad = [torch.zeros(cfg.llm.hidden_size)] * (length - n)
        columns.append(torch.stack(pieces + pad))
    hidden = torch.stack(columns, dim=1)  # [length, b, h]
    mask = causal_segment_mask(segments, positions)
    losses = llm(None, positions, attention_mask=mask, decoder_input=hidden, labels=labels)
    valid = labels >= 0
    return losses[valid].sum(), valid.sum()


def run_reference(checkpoint: str) -> dict:
    """Build the model at TP = SP = PP = 1, save it, and compute the reference loss/gradients."""
    import os

    from megatron.core import dist_checkpointing, parallel_state

    from megatron_longvila.models.llm import LanguageModel
    from megatron_longvila.models.longvila_step import build_longvila_model

    parallel_state.initialize_model_parallel()
    (model,) = build_longvila_model(PLAIN_CFG, transformer_overrides=OVERRIDES)
    if torch.distributed.get_rank() == 0:
        os.makedirs(checkpoint, exist_ok=True)
    torch.distributed.barrier()
    dist_checkpointing.save(model.sharded_state_dict(), checkpoint)
    keys = sorted(model.sharded_state_dict())

    # The logits path gives the same token losses (cross entropy of the returned logits).
    inputs = model.prepare_inputs(micro_batches()[0])
    with torch.no_grad():
        logits = model(inputs, return_logits=True)  # [b, s, vocab]
        losses = model(inputs)
    labels = inputs.labels
    from_logits = torch.nn.functional.cross_entropy(
        logits.flatten(0, 1), labels.flatten().clamp(min=0), reduction="none"
    ).view_as(labels)
    logits_error = (from_logits - losses)[labels >= 0].abs().max().item()

    # megatron's own attention
    llm = LanguageModel(CFG.llm, transformer_overrides=OVERRIDES, memory=PLAIN_CFG.memory)
    llm.load_state_dict(model.llm.state_dict())
    sums = [_reference_loss_sum(model, llm, batch, CFG) for batch in micro_batches()]
    total, count = sum(s for s, _ in sums), sum(c for _, c in sums)
    (total / count).backward()
    grads = {
        f"{prefix}.{name}": p.grad.clone()
        for prefix, module in (
            ("vision_tower", model.vision_tower),
            ("mm_projector", model.mm_projector),
            ("llm", llm),
        )
        for name, p in module.named_parameters()
        if p.requires_grad
    }
    return {"loss": float(total / count), "grads": grads, "keys": keys, "logits": logits_error}


def run_uint8_vs_float(checkpoint: str) -> float:
    """Largest difference between the logits of the model (sp = 2, dp = 2) fed the loader's
    uint8 pixels and fed the same pixels normalized beforehand (the float path)."""
    from megatron.core import dist_checkpointing, parallel_state

    from megatron_longvila.core.parallel_state import MMSPTopology, initialize_mmsp
    from megatron_longvila.models.longvila_step import build_longvila_model

    initialize_mmsp(MMSPTopology(ulysses=2))
    (model,) = build_longvila_model(CFG, transformer_overrides=OVERRIDES)
    model.load_state_dict(dist_checkpointing.load(model.sharded_state_dict(), checkpoint))
    index = parallel_state.get_data_parallel_rank()
    pixels, normalized = uint8_media(micro_batches()[index], seed=index)
    with torch.no_grad():
        logits = [model(model.prepare_inputs(b), return_logits=True) for b in (pixels, normalized)]
    assert logits[0].abs().max() > 0
    return float((logits[0] - logits[1]).abs().max())


# ---- what the exchange must send, computed independently ---------------------------------------


def _expected_exchange_tokens(batch, sp: int, tp: int) -> list[int]:
    """Per sp rank: visual tokens it encodes that another rank holds (sent forward) plus tokens
    it holds that another rank encoded (their gradients, sent backward). Rows are padded to a
    multiple of 2·sp, times tp under TP sequence parallelism."""
    rows = reference_rows(batch, CFG)
    # The position in its row of every visual token, in frame order.
    positions = [t for row in rows for t, (kind, _) in enumerate(row["tokens"]) if kind == "visual"]
    lengths = [len(row["tokens"]) for row in rows]
    tokens_per_frame = CFG.tokens_per_frame
    multiple = 2 * sp * tp
    seq = -(-max(lengths) // multiple) * multiple
    holder = {}
    for rank in range(sp):
        for p in shard_token_indices(seq, sp, rank).tolist():
            holder[p] = rank
    encoder = []
    for rank, n in enumerate(frames_per_rank(batch.num_frames, sp)):
        encoder += [rank] * (n * tokens_per_frame)
    counts = [0] * sp
    for t, enc in zip(positions, encoder):
        if holder[t] != enc:
            counts[enc] += 1  # forward: the encoder sends it
            counts[holder[t]] += 1  # backward: the holder sends its gradient
    return counts


# ---- tests ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reference(rank_pools):
    checkpoint = tempfile.mkdtemp(prefix="mlv-longvila-") + "/init"
    result = rank_pools(4).run(run_reference, checkpoint)[0]
    return result, checkpoint


def test_checkpoint_keys_name_the_three_parts(reference):
    keys = reference[0]["keys"]
    assert {k.split(".")[0] for k in keys} == {"vision_tower", "mm_projector", "llm"}


def test_logits_give_the_token_losses(reference):
    assert reference[0]["logits"] <= TOLERANCE


def test_uint8_pixels_give_the_float_paths_output(rank_pools, reference):
    errors = rank_pools(4).run(run_uint8_vs_float, reference[1])
    assert max(errors) <= 1e-6, errors


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_sharded_model_equals_unsharded(rank_pools, reference, layout):
    ref, checkpoint = reference
    tp, ulysses, ring, pp = LAYOUTS[layout]
    sp = ulysses * ring
    results = rank_pools(4).run(run_layout, tp, ulysses, ring, pp, checkpoint)

    merged: dict[str, torch.Tensor] = {}
    for rank, result in enumerate(results):
        assert result["sequence_parallel"] == (tp > 1), rank
        if result["loss"] is not None:
            assert result["loss"] == pytest.approx(ref["loss"], abs=TOLERANCE), rank
        for name, grad in result["grads"].items():
            assert name in ref["grads"], name
            error = (grad - ref["grads"][name]).abs().max().item()
            assert error <= TOLERANCE, (layout, rank, name, error)
            merged[name] = grad
    assert set(merged) == set(ref["grads"]), "every parameter is somewhere"
    assert all(g.abs().max() > 0 for g in ref["grads"].values()), "gradients that can be wrong"
    assert any(r["loss"] is not None for r in results)

    batches = micro_batches()
    for rank, result in enumerate(results):
        if not result["first_stage"]:
            assert result["encoded"] == [] and result["exchange_bytes"] == 0
            continue
        mine = batches[result["dp_rank"] :: 4 // (sp * tp * pp)]  # as run_layout splits them
        share = [frames_per_rank(b.num_frames, sp)[result["sp_rank"]] for b in mine]
        assert result["encoded"] == share, (rank, result["encoded"], share)
        tokens = sum(_expected_exchange_tokens(b, sp, tp)[result["sp_rank"]] for b in mine)
        assert result["exchange_bytes"] == tokens * CFG.llm.hidden_size * 4, rank
        # Less than the all-reduce of the whole buffer (forward alone would send this much).
        all_visual = sum(b.num_frames for b in mine) * CFG.tokens_per_frame
        assert tokens * CFG.llm.hidden_size * 4 < 2 * all_visual * CFG.llm.hidden_size * 4
