"""megatron-core's GPTModel trains on gloo ranks: TP=2 × PP=2 equals TP=1 × PP=1.

Reference: the same model (weights moved between layouts by dist_checkpointing) trained on one
tensor/pipeline rank. Both runs go through mcore DDP, ``get_megatron_optimizer`` (Adam, clipping)
and ``get_forward_backward_func`` (1F1B with PP=2). Tolerance: 1e-5 absolute on each step's loss
(fp32).
"""

from __future__ import annotations

import tempfile

import pytest


def _train(tp: int, pp: int, steps: int, load_dir=None, save_dir=None):
    from megatron.core import parallel_state
    from tiny_gpt import TinyGPTSettings, train

    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp
    )
    layout = (
        parallel_state.get_tensor_model_parallel_world_size(),
        parallel_state.get_pipeline_model_parallel_world_size(),
    )
    return layout, train(TinyGPTSettings(), steps, load_dir=load_dir, save_dir=save_dir)


def test_tp2_pp2_losses_equal_tp1_pp1(ranks4):
    init = tempfile.mkdtemp(prefix="mlv-gpt-init-") + "/init"
    reference = ranks4.run(_train, 1, 1, 3, save_dir=init)
    parallel = ranks4.run(_train, 2, 2, 3, load_dir=init)

    ref_losses = reference[0][1]
    assert all(layout == (1, 1) for layout, _ in reference)
    assert all(layout == (2, 2) for layout, _ in parallel)
    assert ref_losses[-1] < ref_losses[0], "the model should learn"
    for _, losses in parallel:
        assert losses == pytest.approx(ref_losses, abs=1e-5)


def test_layouts_differ_without_shared_weights(ranks4):
    """Guards the test above: without loading the reference weights the losses differ."""
    reference = ranks4.run(_train, 1, 1, 1)
    parallel = ranks4.run(_train, 2, 2, 1)
    assert abs(reference[0][1][0] - parallel[0][1][0]) > 1e-4
