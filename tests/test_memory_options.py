"""The memory options of ``MemoryConfig`` change no loss and no gradient.

Reference: the same layout with every option off (whole logits through megatron-core's
``vocab_parallel_cross_entropy``, megatron's MLP and norms keeping all their tensors, nothing
offloaded), from the same weights (a dist checkpoint) and batches. Under test: each option alone
— the loss in chunks of 3 tokens (so chunks end mid-row and the last one is short), the MLP
activation recomputed, the norms recomputed, the first two layers offloaded — and all defaults
under megatron's full layer recomputation, in the layouts
TP 2 × Ulysses 2, TP 2 × ring 2 and PP 2 × Ulysses 2 (four ranks, two micro-batches of packed
multimodal rows). Tolerance: 1e-6 absolute on the loss and every gradient (fp32).

Also: the chunked cross entropy alone at TP 2 against ``vocab_parallel_cross_entropy`` on the
whole logits, with padding columns and ignored labels; and the saved tensors of a layer shrink by
what each option says.
"""

from __future__ import annotations

import tempfile
from dataclasses import replace

import pytest
import torch
from longvila_batches import CFG
from longvila_layouts import OVERRIDES, run_layout

from megatron_longvila.models.config import MemoryConfig

TOLERANCE = 1e-6
PLAIN = MemoryConfig.keep_everything()
OPTIONS = {
    "loss_in_chunks": replace(PLAIN, loss_chunk_tokens=3),
    "recompute_activation": replace(PLAIN, recompute_activation=True),
    "norm_keeps_input": replace(PLAIN, norm_keeps_input=True),
    "offload_two_layers": replace(PLAIN, offload_layers=2),
}
LAYOUTS = {  # name: (tp, ulysses, ring, pp)
    "tp2_ulysses2": (2, 2, 1, 1),
    "tp2_ring2": (2, 1, 2, 1),
    "pp2_ulysses2": (1, 2, 1, 2),
}


def save_initial_weights(checkpoint: str) -> None:
    import os

    from megatron.core import dist_checkpointing, parallel_state

    from megatron_longvila.models.longvila_step import build_longvila_model

    parallel_state.initialize_model_parallel()
    (model,) = build_longvila_model(replace(CFG, memory=PLAIN), transformer_overrides=OVERRIDES)
    if torch.distributed.get_rank() == 0:
        os.makedirs(checkpoint, exist_ok=True)
    torch.distributed.barrier()
    dist_checkpointing.save(model.sharded_state_dict(), checkpoint)
    parallel_state.destroy_model_parallel()


LAYER_RECOMPUTE = {
    "recompute_granularity": "full",
    "recompute_method": "uniform",
    "recompute_num_layers": 1,
}


def run_options(layout: tuple[int, int, int, int], checkpoint: str) -> dict:
    """Per memory setting (plain first, then each option, then all defaults under megatron's
    full layer recomputation): this rank's loss and gradients in ``layout``."""
    from megatron.core import parallel_state

    settings = {name: (memory, {}) for name, memory in {"plain": PLAIN, **OPTIONS}.items()}
    settings["defaults_with_layer_recompute"] = (MemoryConfig(), LAYER_RECOMPUTE)
    results = {}
    for name, (memory, extra) in settings.items():
        result = run_layout(
            *layout, checkpoint, cfg=replace(CFG, memory=memory), overrides={**OVERRIDES, **extra}
        )
        results[name] = {"loss": result["loss"], "grads": result["grads"]}
        parallel_state.destroy_model_parallel()
    return results


def chunked_against_whole_logits() -> dict:
    """At TP 2: the chunked cross entropy and megatron-core's on the whole logits, with a padded
    vocabulary (30 real ids of 32) and ignored labels; max errors of losses and gradients."""
    from megatron.core import parallel_state, tensor_parallel

    from megatron_longvila.models.loss import chunked_vocab_parallel_cross_entropy

    parallel_state.initialize_model_parallel(tensor_model_parallel_size=2)
    try:
        tp_rank = parallel_state.get_tensor_model_parallel_rank()
        gen = torch.Generator().manual_seed(5)
        n, h, vocab, real = 11, 8, 32, 30
        hidden = torch.randn(n, h, generator=gen)
        weight_full = torch.randn(vocab, h, generator=gen)
        labels = torch.randint(0, real, (n,), generator=gen)
        labels[[2, 7]] = -100
        weight = weight_full.chunk(2)[tp_rank]
        start = tp_rank * vocab // 2
        grad_out = torch.rand(n, generator=gen)

        def whole(h_in, w_in):
            logits = (h_in @ w_in.t()).unsqueeze(1)  # [n, 1, V/2]
            padding = torch.arange(start, start + vocab // 2) >= real
            logits = logits.masked_fill(padding, float("-inf"))
            losses = tensor_parallel.vocab_parallel_cross_entropy(logits, labels.unsqueeze(1))
            return losses.squeeze(1).masked_fill(labels < 0, 0.0)

        def chunked(h_in, w_in):
            group = parallel_state.get_tensor_model_parallel_group()
            return chunked_vocab_parallel_cross_entropy(
                h_in,
                w_in,
                labels,
                vocab_start=start,
                vocab_size=real,
                chunk_tokens=4,
                tp_group=group,
            )

        outputs = []
        for loss_fn in (whole, chunked):
            h_in = hidden.clone().requires_grad_()
            w_in = weight.clone().requires_grad_()
            losses = loss_fn(h_in, w_in)
            (losses * grad_out).sum().backward()
            # hidden is replicated over TP: its gradient is the sum of the ranks' parts.
            grad_h = h_in.grad.clone()
            torch.distributed.all_reduce(
                grad_h, group=parallel_state.get_tensor_model_parallel_group()
            )
            outputs.append((losses.detach(), grad_h, w_in.grad))
        errors = {
            name: (a - b).abs().max().item()
            for name, a, b in zip(("loss", "hidden", "weight"), outputs[0], outputs[1])
        }
        errors["ignored_zero"] = bool((outputs[1][0][labels < 0] == 0).all())
        return errors
    finally:
        parallel_state.destroy_model_parallel()


@pytest.fixture(scope="module")
def checkpoint(rank_pools):
    path = tempfile.mkdtemp(prefix="mlv-memory-") + "/init"
    rank_pools(4).run(save_initial_weights, path)
    return path


def test_chunked_cross_entropy_equals_whole_logits(rank_pools):
    for errors in rank_pools(4).run(chunked_against_whole_logits):
        assert errors.pop("ignored_zero")
        assert all(e <= TOLERANCE for e in errors.values()), errors


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_each_option_keeps_losses_and_gradients(rank_pools, checkpoint, layout):
    for rank, results in enumerate(rank_pools(4).run(run_options, LAYOUTS[layout], checkpoint)):
        plain = results.pop("plain")
        assert plain["grads"], rank
        for option, result in results.items():
            if plain["loss"] is not None:
                assert result["loss"] == pytest.approx(plain["loss"], abs=TOLERANCE), option
            assert set(result["grads"]) == set(plain["grads"]), option
            for name, grad in result["grads"].items():
                error = (grad - plain["grads"][name]).abs().max().item()
                assert error <= TOLERANCE, (layout, option, rank, name, error)
