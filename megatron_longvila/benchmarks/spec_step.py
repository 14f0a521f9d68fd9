"""One LLM training step under each layer spec (Transformer Engine vs local): tokens/s and MFU.

The model is this project's :class:`~megatron_longvila.models.llm.LanguageModel` with MM-SP
attention (sp = 1), built once per layer spec (``MLV_LAYER_SPEC``) from the same shape: by
default the first 4 layers of Qwen2-7B (hidden 3584, 28:4 heads, d = 128, SwiGLU 18944, vocab
152064), one sequence of 8k tokens, bf16 on a GPU. A step is forward, token losses, backward
(no optimizer). Reported per spec: median step time, tokens/s, model TFLOP/s and MFU against
the GPU's dense bf16 peak (when the card is known).

FLOPs per step: 3 × 2 × (linear weights) × tokens for the matmuls (forward + 2× backward) plus
causal attention, 2·S²·d·heads per layer forward and 2.5× that backward.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import time
from collections.abc import Iterator
from functools import partial
from typing import Any

import torch

from megatron_longvila.core import platform
from megatron_longvila.models.config import LLMConfig

#: The first 4 layers of Qwen2-7B (LongVILA's LLM).
GPT_7B_4_LAYERS = LLMConfig.preset("qwen2-7b", num_layers=4)
SEQ = 8192

#: Dense bf16 peak TFLOP/s by card name (vendor data sheets; no sparsity).
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "GH200": 989.0, "A100": 312.0, "B200": 2250.0}


def step_flops(cfg: LLMConfig, seq: int) -> float:
    """Model FLOPs of one forward + backward of ``seq`` tokens (see the module docstring)."""
    h, d = cfg.hidden_size, cfg.kv_channels
    per_layer = (
        h * (cfg.num_heads + 2 * cfg.num_kv_heads) * d  # fused QKV
        + cfg.num_heads * d * h  # output projection
        + 3 * h * cfg.ffn_hidden_size  # SwiGLU: gate, up, down
    )
    linear = cfg.num_layers * per_layer + h * cfg.padded_vocab_size  # + the output layer
    attention = cfg.num_layers * 2 * seq * seq * d * cfg.num_heads
    return 6 * linear * seq + 3.5 * attention


def peak_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for card, peak in PEAK_BF16_TFLOPS.items() if card in name), None)


@contextlib.contextmanager
def layer_spec(backend: str) -> Iterator[None]:
    """Build with ``backend``'s modules (``MLV_LAYER_SPEC``) inside the block."""
    before = os.environ.get(platform.LAYER_SPEC_ENV)
    os.environ[platform.LAYER_SPEC_ENV] = backend
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(platform.LAYER_SPEC_ENV)
        else:
            os.environ[platform.LAYER_SPEC_ENV] = before


def _train_step(model, inputs, positions, labels) -> None:
    model.zero_grad(set_to_none=True)
    model(inputs, positions, labels=labels).mean().backward()


def _median_s(fn, device: torch.device, repeats: int) -> float:
    fn()  # warm-up (kernel selection, allocator)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def spec_step(
    device: torch.device,
    cfg: LLMConfig = GPT_7B_4_LAYERS,
    seq: int = SEQ,
    repeats: int = 3,
) -> list[dict[str, Any]]:
    """One row per layer spec (``te`` where Transformer Engine runs, and ``local``).

    Needs megatron-core's parallel state with tp = pp = sp = 1 (``initialize_mmsp``); started
    here as a one-process world when none is.
    """
    from megatron.core import parallel_state, tensor_parallel

    from megatron_longvila.core.parallel_state import MMSPTopology, initialize_mmsp
    from megatron_longvila.core.sequence_parallel.attention import MMSPAttention
    from megatron_longvila.models.llm import LanguageModel

    if not parallel_state.model_parallel_is_initialized():
        platform.init_single_process()
        initialize_mmsp(MMSPTopology())
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (1, seq + 1), generator=gen).to(device)
    inputs, labels = ids[:, :-1], ids[:, 1:]
    positions = torch.arange(seq, device=device).unsqueeze(0)
    flops, peak = step_flops(cfg, seq), peak_tflops(device)
    rows: list[dict[str, Any]] = []
    for backend in platform.LAYER_SPECS:
        if backend == "te" and not platform.transformer_engine_available():
            rows.append({"check": "spec_step", "spec": backend, "status": "not installed"})
            continue
        platform.seed_everything(0)
        tensor_parallel.model_parallel_cuda_manual_seed(0)
        with layer_spec(backend):
            model = LanguageModel(
                cfg,
                core_attention=MMSPAttention,
                params_dtype=dtype,
                transformer_overrides={"context_parallel_size": 1},
            ).to(device)
        seconds = _median_s(partial(_train_step, model, inputs, positions, labels), device, repeats)
        tflops = flops / seconds / 1e12
        rows.append(
            {
                "check": "spec_step",
                "spec": backend,
                "layers": cfg.num_layers,
                "seq": seq,
                "dtype": str(dtype).removeprefix("torch."),
                "step_ms": seconds * 1e3,
                "tokens_per_s": seq / seconds,
                "model_tflops": tflops,
                "mfu": None if peak is None else tflops / peak,
            }
        )
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows
