"""bf16 training on the CPU under MM-SP 2 × 2 tracks the fp32 run.

Four gloo ranks, Ulysses 2 × ring 2, the tiny LongVILA model trained for ``STEPS`` Adam steps on
the same two micro-batches (packed rows with videos, images and text), once with fp32 parameters
and once with bf16 parameters loaded from the same fp32 weights. In the bf16 run the
attention's partial outputs merge by lse in fp32 and the ring's dK/dV accumulators are fp32
(ring.py), megatron's DDP reduces gradients in fp32 (``grad_reduce_in_fp32``) and its optimizer
keeps fp32 main weights. Reference: the fp32 run.
Tolerance: every step's loss within 1% of the fp32 run's (bf16 keeps 8 significant bits, 0.4%
per rounding; measured here: at most 0.3% over the 6 steps); both runs must lower the loss by
more than 1% of its start (they lower it by ~38%), and by amounts within 5% of each other
(measured: 0.5%).
"""

from __future__ import annotations

import pytest
import torch
from longvila_batches import CFG, micro_batches

STEPS = 6
LR = 1e-2
LOSS_RTOL = 0.01
DROP_RTOL = 0.05


def train_losses(dtype_name: str) -> dict:
    """The mean token loss of each step (before that step's update) on this rank's replica."""
    from megatron.core import parallel_state
    from megatron.core.distributed import DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_longvila.core.parallel_state import MMSPTopology, initialize_mmsp
    from megatron_longvila.models.longvila_step import build_longvila_model, forward_step

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    initialize_mmsp(MMSPTopology(ulysses=2, ring=2))
    (fp32_model,) = build_longvila_model(CFG)  # the shared start: fp32 weights, one seed
    ddp = DistributedDataParallelConfig(grad_reduce_in_fp32=True, bucket_size=None)
    (model,) = build_longvila_model(CFG, ddp_config=ddp, params_dtype=dtype)
    model.module.load_state_dict(fp32_model.state_dict())  # cast to bf16 on copy
    optimizer = get_megatron_optimizer(
        OptimizerConfig(
            optimizer="adam",
            lr=LR,
            weight_decay=0.0,
            clip_grad=1.0,
            bf16=dtype == torch.bfloat16,
            params_dtype=dtype,
        ),
        [model],
    )
    batches = micro_batches()
    losses = []
    for _ in range(STEPS):
        model.zero_grad_buffer()
        optimizer.zero_grad()
        reduced = get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iter(batches),
            model=[model],
            num_microbatches=len(batches),
            seq_length=0,
            micro_batch_size=batches[0].batch_size,
        )
        report = sum(item["lm loss"] for item in reduced)
        losses.append(float(report[0] / report[1]))
        success, _, _ = optimizer.step()
        assert success
    params = [p for p in model.module.parameters() if p.requires_grad]
    return {
        "losses": losses,
        "param_dtypes": {str(p.dtype) for p in params},
        "fp32_params": [n for n, p in model.module.named_parameters() if p.dtype == torch.float32],
        "grad_dtypes": {str(p.main_grad.dtype) for p in params},
        "sp": parallel_state.get_context_parallel_world_size(),
    }


@pytest.fixture(scope="module")
def runs(rank_pools):
    pool = rank_pools(4)
    return {name: pool.run(train_losses, name) for name in ("fp32", "bf16")}


def test_bf16_run_holds_bf16_weights_and_fp32_gradients(runs):
    for rank, result in enumerate(runs["bf16"]):
        assert result["sp"] == 4, rank
        assert result["param_dtypes"] == {"torch.bfloat16"}, (rank, result["fp32_params"])
        assert result["grad_dtypes"] == {"torch.float32"}, rank
    assert runs["fp32"][0]["param_dtypes"] == {"torch.float32"}


def test_bf16_loss_curve_tracks_fp32(runs):
    reference = runs["fp32"][0]["losses"]
    for rank, result in enumerate(runs["bf16"]):
        assert result["losses"] == runs["bf16"][0]["losses"], "every sp rank reports one loss"
        for step, (got, want) in enumerate(zip(result["losses"], reference)):
            assert abs(got - want) <= LOSS_RTOL * want, (rank, step, got, want)
    bf16 = runs["bf16"][0]["losses"]
    drop_fp32, drop_bf16 = reference[0] - reference[-1], bf16[0] - bf16[-1]
    assert drop_fp32 > LOSS_RTOL * reference[0], f"the run must learn: {reference}"
    assert drop_bf16 > LOSS_RTOL * bf16[0], f"the run must learn: {bf16}"
    assert abs(drop_bf16 - drop_fp32) <= DROP_RTOL * drop_fp32, (reference, bf16)
