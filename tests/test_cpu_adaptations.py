"""Each CPU adaptation of megatron-core is needed and works; importing the package changes nothing.

Every check below exercises one adapted megatron-core spot. In a 2-rank gloo pool the test
removes that one adaptation, expects the check to fail, puts it back and expects it to pass.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

import pytest
import torch

from megatron_longvila.core import cpu_adaptations, platform

ADAPTATION_NAMES = [a.name for a in cpu_adaptations.ADAPTATIONS]


# ---- checks (run on every rank of a 2-rank pool) ----------------------------------------------


def _tiny_ddp_model():
    import tiny_gpt

    settings = tiny_gpt.TinyGPTSettings(num_layers=1, hidden_size=16, num_attention_heads=2)
    return tiny_gpt, settings, tiny_gpt.build_model(settings)


def check_rng_tracker():
    from megatron.core import tensor_parallel

    tensor_parallel.model_parallel_cuda_manual_seed(7, tp_rank=0, ep_rank=0, etp_rank=0)
    tracker = tensor_parallel.get_cuda_rng_tracker()
    outside = torch.get_rng_state()
    with tracker.fork():
        first = torch.rand(4)
    assert torch.equal(torch.get_rng_state(), outside), "fork must restore the default stream"
    with tracker.fork():
        second = torch.rand(4)
    assert not torch.equal(first, second), "the forked stream must advance"
    tensor_parallel.model_parallel_cuda_manual_seed(7, tp_rank=0, ep_rank=0, etp_rank=0)
    with tensor_parallel.get_cuda_rng_tracker().fork():
        assert torch.equal(torch.rand(4), first), "the same seed must give the same stream"


def check_get_cuda_rng_state():
    """Activation recomputation replays the same dropout mask: gradients equal the plain ones."""
    from megatron.core import tensor_parallel

    weight = torch.randn(8)
    x = torch.randn(4, 8, requires_grad=True)

    def block(inp):
        with tensor_parallel.get_cuda_rng_tracker().fork():
            return torch.nn.functional.dropout(inp * weight, p=0.5, training=True)

    grads = []
    for recompute in (False, True):
        tensor_parallel.model_parallel_cuda_manual_seed(3, tp_rank=0, ep_rank=0, etp_rank=0)
        x.grad = None
        out = tensor_parallel.checkpoint(block, False, x) if recompute else block(x)
        out.sum().backward()
        grads.append(x.grad.clone())
    assert torch.equal(grads[0], grads[1])
    assert 0 < int((grads[0] == 0).sum()) < grads[0].numel()  # dropout did drop some


def check_rotary_embedding_device():
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    rope = RotaryEmbedding(kv_channels=8, rotary_percent=1.0)
    freqs = rope(6)
    assert freqs.shape == (6, 1, 1, 8) and freqs.device.type == "cpu"


def check_rope_cp_slice():
    """With CP=2, RoPE keeps this rank's zigzag chunks (r and 3−r of 4) of the embedding."""
    from megatron.core import parallel_state
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    parallel_state.initialize_model_parallel(context_parallel_size=2)
    rank = parallel_state.get_context_parallel_rank()
    rope = RotaryEmbedding(kv_channels=8, rotary_percent=1.0)
    full = rope.get_emb(8)  # [8, 1, 1, 8], unsliced
    expected = torch.cat([full[2 * rank : 2 * rank + 2], full[6 - 2 * rank : 8 - 2 * rank]])
    assert torch.equal(rope(8), expected)


def check_global_memory_buffer_device():
    from megatron.core.utils import GlobalMemoryBuffer, local_multi_tensor_l2_norm

    buf = GlobalMemoryBuffer().get_tensor((2, 3), torch.float32, "x")
    assert buf.shape == (2, 3)
    norm, _ = local_multi_tensor_l2_norm(0, None, [[torch.ones(4)]], False)
    assert float(norm) == pytest.approx(2.0)


def check_default_causal_mask_device():
    # fused_softmax imported the function by name: adapting its home module must reach it.
    from megatron.core.fusions.fused_softmax import get_default_causal_mask

    assert torch.equal(get_default_causal_mask(3), torch.ones(3, 3).triu(1).bool())


def check_tensor_parallel_mappings_device():
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    parallel_state.initialize_model_parallel(tensor_model_parallel_size=2)
    rank = torch.distributed.get_rank()
    out = gather_from_tensor_model_parallel_region(torch.full((2, 1), float(rank)))
    assert torch.equal(out, torch.tensor([[0.0, 1.0], [0.0, 1.0]]))


def check_tensor_parallel_layers_device():
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import ColumnParallelLinear
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_longvila.core import platform

    parallel_state.initialize_model_parallel(tensor_model_parallel_size=2)
    config = TransformerConfig(
        num_layers=1,
        hidden_size=4,
        num_attention_heads=2,
        tensor_model_parallel_size=2,
        sequence_parallel=True,
        **platform.portable_transformer_options(),
    )
    linear = ColumnParallelLinear(4, 4, config=config, init_method=torch.nn.init.ones_, bias=False)
    x = torch.ones(2, 1, 4, requires_grad=True)  # this rank's half of a 4-token sequence
    out, _ = linear(x)  # the sequence is gathered: [4, 1, 2]
    out.sum().backward()  # the input gradient is reduce-scattered back
    assert out.shape == (4, 1, 2) and torch.equal(x.grad, torch.full((2, 1, 4), 4.0))


def check_pipeline_schedules_device():
    from megatron.core import parallel_state

    parallel_state.initialize_model_parallel()
    tiny_gpt, settings, _ = _tiny_ddp_model()
    settings.num_layers, settings.hidden_size, settings.num_attention_heads = 1, 16, 2
    losses = tiny_gpt.train(settings, steps=1)
    assert len(losses) == 1 and losses[0] > 0


def check_p2p_communication_device():
    from megatron.core import parallel_state
    from megatron.core.model_parallel_config import ModelParallelConfig
    from megatron.core.pipeline_parallel.p2p_communication import P2PCommunicator

    parallel_state.initialize_model_parallel(pipeline_model_parallel_size=2)
    config = ModelParallelConfig(
        pipeline_model_parallel_size=2,
        pipeline_dtype=torch.float32,
        variable_seq_lengths=True,  # exercises the shape exchange and its synchronize()
        batch_p2p_sync=True,
    )
    comm = P2PCommunicator(parallel_state.get_pipeline_model_parallel_group(), config)
    if parallel_state.is_pipeline_first_stage():
        comm.send_forward(torch.arange(6.0).view(3, 1, 2), is_last_stage=False)
    else:
        got = comm.recv_forward((3, 1, 2), is_first_stage=False)
        assert torch.equal(got, torch.arange(6.0).view(3, 1, 2))


def check_param_and_grad_buffer_device():
    from megatron.core import parallel_state

    parallel_state.initialize_model_parallel()
    _, _, model = _tiny_ddp_model()
    assert all(p.main_grad.device.type == "cpu" for p in model.module.parameters())


def _optimizer_step(clip_grad: float):
    from megatron.core import parallel_state
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    parallel_state.initialize_model_parallel()
    _, _, model = _tiny_ddp_model()
    optimizer = get_megatron_optimizer(
        OptimizerConfig(optimizer="sgd", lr=1.0, weight_decay=0.0, clip_grad=clip_grad), [model]
    )
    params = list(model.module.parameters())
    before = [p.detach().clone() for p in params]
    for p in params:
        p.main_grad.fill_(1.0)
    success, grad_norm, _ = optimizer.step()
    assert success
    step = torch.cat([(b - p.detach()).flatten() for b, p in zip(before, params)])
    return grad_norm, step


def check_float16_optimizer_param_types():
    from megatron.core import parallel_state
    from megatron.core.optimizer import OptimizerConfig
    from megatron.core.optimizer.optimizer import Float16OptimizerWithFloat16Params

    parallel_state.initialize_model_parallel()
    half = torch.nn.Parameter(torch.ones(3, dtype=torch.bfloat16))
    full = torch.nn.Parameter(torch.ones(2))
    for p in (half, full):
        p.main_grad = torch.ones(p.shape)  # megatron's DDP keeps gradients there, fp32
    config = OptimizerConfig(
        optimizer="sgd", lr=0.5, bf16=True, params_dtype=torch.bfloat16, clip_grad=0.0
    )
    optimizer = Float16OptimizerWithFloat16Params(
        torch.optim.SGD([half, full], lr=0.5), config, None, lambda *_: None
    )
    assert optimizer.float16_groups == [[half]] and optimizer.fp32_from_fp32_groups == [[full]]
    assert optimizer.fp32_from_float16_groups[0][0].dtype == torch.float32  # the main copy
    success, _, _ = optimizer.step()
    assert success and torch.equal(half, torch.full((3,), 0.5, dtype=torch.bfloat16))
    assert torch.equal(full.detach(), torch.full((2,), 0.5))


def check_optimizer_device():
    _, step = _optimizer_step(clip_grad=0.0)
    assert torch.allclose(step, torch.ones_like(step))  # sgd, lr 1, grad 1


def check_clip_grads_device():
    grad_norm, _ = _optimizer_step(clip_grad=1e9)
    _, _, model = _tiny_ddp_model()
    numel = sum(p.numel() for p in model.module.parameters())
    assert grad_norm == pytest.approx(numel**0.5, rel=1e-5)


def check_clip_grad_by_total_norm_fp32():
    grad_norm, step = _optimizer_step(clip_grad=0.5)
    # Clipped to total norm 0.5: every unit gradient is scaled by 0.5 / grad_norm.
    assert torch.allclose(step, torch.full_like(step, 0.5 / grad_norm), rtol=1e-4)


def _save_and_load(directory: str, async_save: bool):
    from megatron.core import dist_checkpointing, parallel_state
    from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

    parallel_state.initialize_model_parallel(tensor_model_parallel_size=2)
    _, _, model = _tiny_ddp_model()
    if torch.distributed.get_rank() == 0:
        os.makedirs(directory, exist_ok=True)
    torch.distributed.barrier()
    if async_save:
        queue = AsyncCallsQueue()
        request = dist_checkpointing.save(
            model.module.sharded_state_dict(), directory, async_sharded_save=True
        )
        queue.schedule_async_request(request)
        queue.maybe_finalize_async_calls(blocking=True)
        queue.close()
    else:
        dist_checkpointing.save(model.module.sharded_state_dict(), directory)
    expected = {k: v.clone() for k, v in model.module.state_dict().items() if v is not None}
    for p in model.module.parameters():
        p.data.zero_()
    model.module.load_state_dict(
        dist_checkpointing.load(model.module.sharded_state_dict(), directory), strict=False
    )
    for key, value in model.module.state_dict().items():
        if key in expected and isinstance(value, torch.Tensor):
            assert torch.equal(value, expected[key]), key


def check_checkpoint_writer_device(directory):
    _save_and_load(directory, async_save=True)


def check_checkpoint_saver_device(directory):
    _save_and_load(directory, async_save=False)


def check_checkpoint_async_device(directory):
    _save_and_load(directory, async_save=True)


def check_tied_embedding_setup_device():
    from megatron.core import parallel_state

    from megatron_longvila.models.config import LLMConfig
    from megatron_longvila.models.llm import LanguageModel

    parallel_state.initialize_model_parallel(pipeline_model_parallel_size=2)
    first = parallel_state.is_pipeline_first_stage()
    torch.manual_seed(torch.distributed.get_rank())  # different draws: the sync must matter
    model = LanguageModel(
        LLMConfig.preset("tiny", tie_word_embeddings=True),
        pre_process=first,
        post_process=not first,
    )
    weight = model.shared_embedding_or_output_weight().detach().clone()
    peer = torch.empty_like(weight)
    torch.distributed.all_reduce(peer.copy_(weight), op=torch.distributed.ReduceOp.MAX)
    assert torch.equal(weight, peer), "both stages must hold the first stage's embedding"


def check_recompute_norm_without_te():
    """A norm recomputed as megatron-core's selective "layernorm" recomputation does it (output
    freed after the next op, recomputed in the backward) gives the plain gradients."""
    from megatron.core.tensor_parallel.random import CheckpointWithoutOutput

    norm = torch.nn.RMSNorm(8)
    weight = torch.randn(8, 8)
    x = torch.randn(4, 8, requires_grad=True)
    (norm(x) @ weight).square().sum().backward()
    plain = x.grad.clone()
    x.grad = None
    recompute = CheckpointWithoutOutput()  # the call TransformerLayer makes
    out = recompute.checkpoint(norm, x) @ weight
    recompute.discard_output_and_register_recompute(out)
    out.square().sum().backward()
    torch.testing.assert_close(x.grad, plain, rtol=0, atol=1e-6)


CHECKS = {name: globals()[f"check_{name}"] for name in ADAPTATION_NAMES}


def _without_then_with(name: str, *args):
    """Run the check with the adaptation removed (must fail), then restored (must pass)."""
    from megatron.core import parallel_state

    check = CHECKS[name]
    cpu_adaptations.undo_megatron_adaptations((name,))
    try:
        check(*args)
        failure = None
    except Exception as exc:
        failure = f"{type(exc).__name__}: {exc}"
    finally:
        parallel_state.destroy_model_parallel()
        cpu_adaptations.adapt_megatron_for_cpu(names=(name,))
    torch.distributed.barrier()
    check(*args)
    return failure


# ---- tests ------------------------------------------------------------------------------------


def test_every_adaptation_has_a_check():
    assert set(CHECKS) == set(ADAPTATION_NAMES)
    for adaptation in cpu_adaptations.ADAPTATIONS:
        assert adaptation.adapts and adaptation.why, adaptation.name


@pytest.mark.parametrize("name", ADAPTATION_NAMES)
def test_adaptation_is_needed_and_works(ranks2, name):
    args = ()
    if name.startswith("checkpoint_"):
        args = (tempfile.mkdtemp(prefix=f"mlv-{name}-"),)
    failures = ranks2.run(_without_then_with, name, *args)
    assert all(failures), f"without '{name}' the check should fail on CPU, got {failures}"


def test_import_changes_nothing():
    """Importing every module of the package leaves torch and megatron-core untouched."""
    probe = r"""
import importlib, pkgutil, torch
from megatron_longvila.core import cpu_adaptations
before = {}
for a in cpu_adaptations.ADAPTATIONS:
    before[a.name] = getattr(a.target(), a.attribute)
current_device = torch.cuda.current_device
import megatron_longvila
for info in pkgutil.walk_packages(megatron_longvila.__path__, "megatron_longvila."):
    importlib.import_module(info.name)
for a in cpu_adaptations.ADAPTATIONS:
    assert getattr(a.target(), a.attribute) is before[a.name], a.name
assert torch.cuda.current_device is current_device
assert not cpu_adaptations.adaptations_active()
print("untouched")
"""
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "untouched" in out.stdout


def test_cpu_view_maps_only_cuda_devices():
    view = cpu_adaptations.CpuTorchView()
    assert view.zeros(2, device="cuda").device.type == "cpu"
    assert view.empty_like(torch.ones(2), device=torch.device("cuda", 0)).device.type == "cpu"
    assert view.tensor([1], device="cpu").device.type == "cpu"
    assert view.cuda.current_device() == torch.device("cpu")
    assert view.nn is torch.nn and view.float32 is torch.float32


def test_adapt_is_a_no_op_with_cuda_unless_forced(monkeypatch):
    monkeypatch.setattr(platform, "cuda_available", lambda: True)
    assert cpu_adaptations.adapt_megatron_for_cpu() is False
    assert not cpu_adaptations.adaptations_active()
    with pytest.raises(ValueError, match="unknown adaptation"):
        cpu_adaptations.adapt_megatron_for_cpu(force=True, names=("no_such_spot",))
