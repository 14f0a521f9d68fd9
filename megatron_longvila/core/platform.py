"""Device, RNG and distributed start-up: the one place that knows about CPU vs GPU.

megatron-core's CUDA assumptions are adapted for CPU machines in :mod:`.cpu_adaptations`; this
module holds what every process needs either way: which device it computes on, the transformer
options that run on both, identical seeds, and joining (or starting) the process group.
"""

from __future__ import annotations

import datetime
import importlib.util
import os
import random
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

# --------------------------------------------------------------------------------------------
# Device and seeds
# --------------------------------------------------------------------------------------------


def cuda_available() -> bool:
    return torch.cuda.is_available()


def transformer_engine_available() -> bool:
    """Whether Transformer Engine's PyTorch layers can run here (CUDA and an importable TE)."""
    if not cuda_available():
        return False
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception:  # a broken install (missing .so, CUDA mismatch) is as good as none
        return False
    return True


def gradient_accumulation_fusion_available() -> bool:
    """Whether weight gradients can be accumulated into megatron's fp32 ``main_grad`` inside the
    GEMM: Transformer Engine for its linears, apex's ``fused_weight_gradient_mlp_cuda`` for
    megatron's own (the output layer)."""
    if not transformer_engine_available():
        return False
    return importlib.util.find_spec("fused_weight_gradient_mlp_cuda") is not None


#: Environment variable forcing the layer spec: ``local`` (megatron-core's own modules) or ``te``.
LAYER_SPEC_ENV = "MLV_LAYER_SPEC"
LAYER_SPECS = ("local", "te")


def layer_spec_backend() -> str:
    """Which modules transformer layers are built from: ``"te"`` (Transformer Engine) on CUDA
    with TE importable, else ``"local"``; :data:`LAYER_SPEC_ENV` overrides. Forcing ``te``
    where TE cannot run raises, naming what is missing."""
    forced = os.environ.get(LAYER_SPEC_ENV)
    if not forced:
        return "te" if transformer_engine_available() else "local"
    if forced not in LAYER_SPECS:
        raise ValueError(f"{LAYER_SPEC_ENV}={forced!r} is not one of {LAYER_SPECS}")
    if forced == "te" and not transformer_engine_available():
        missing = "CUDA" if not cuda_available() else "an importable transformer_engine"
        raise RuntimeError(
            f"{LAYER_SPEC_ENV}=te needs Transformer Engine layers, but {missing} is not "
            "available on this machine"
        )
    return forced


def weight_init_options(weights_loaded: bool = False) -> dict[str, Any]:
    """``TransformerConfig`` fields saying where and whether weights are drawn.

    CPU: drawn on the host from the global generator (``use_cpu_initialization``), the same full
    tensors on every rank whatever the layout. CUDA: created on the device and drawn there with
    megatron's model-parallel RNG (``model_parallel_cuda_manual_seed``), so no rank builds a
    full-size host copy; with ``weights_loaded`` (a checkpoint or HF weights overwrite them all)
    they are only allocated, not drawn.
    """
    if not cuda_available():
        return {"use_cpu_initialization": True, "perform_initialization": True}
    return {"use_cpu_initialization": False, "perform_initialization": not weights_loaded}


def portable_transformer_options() -> dict[str, Any]:
    """``TransformerConfig`` run options that work on CPU and GPU alike: weights drawn as
    :func:`weight_init_options` says (on the CPU from the global generator, so every parallel
    layout starts from the same full tensors), no dropout, no fusion that needs a CUDA kernel,
    and no ``torch.cuda.synchronize()`` around batched pipeline p2p without CUDA. Callers set
    their own fields on top (e.g. fusions on GPUs).
    """
    return {
        **weight_init_options(),
        "hidden_dropout": 0.0,
        "attention_dropout": 0.0,
        "bias_activation_fusion": False,
        "bias_dropout_fusion": False,
        "masked_softmax_fusion": False,
        "gradient_accumulation_fusion": False,
        "apply_rope_fusion": False,
        "persist_layer_norm": False,
        "batch_p2p_sync": cuda_available(),
    }


#: dtype names the command lines and configs accept (short and torch spellings).
DTYPE_NAMES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}


def dtype_from_name(name: str | None) -> torch.dtype | None:
    """The dtype ``name`` stands for (:data:`DTYPE_NAMES`); ``"auto"`` is bf16 on GPUs and fp32
    on the CPU; ``None`` stays ``None`` (the caller keeps what it has)."""
    if name is None:
        return None
    if name == "auto":
        return torch.bfloat16 if cuda_available() else torch.float32
    if name not in DTYPE_NAMES:
        raise ValueError(f"dtype {name!r} is not one of {['auto', *DTYPE_NAMES]}")
    return DTYPE_NAMES[name]


def local_device() -> torch.device:
    """The device this process computes on: its local GPU, or the CPU."""
    if cuda_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and, if present, CUDA) identically.

    megatron-core with ``use_cpu_initialization=True`` draws full weights from the global CPU
    generator before slicing them for tensor parallelism, so every rank must seed it the same.
    """
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def init_distributed(
    backend: str | None = None, timeout_s: float = 600.0, **init_kwargs: Any
) -> None:
    """Join ``torch.distributed`` from the usual launcher variables (torchrun, SLURM + torchrun);
    without them (no ``WORLD_SIZE``), this process is a world of its own
    (:func:`init_single_process`).

    The backend is NCCL with CUDA and gloo without; each GPU process binds to ``LOCAL_RANK``.
    Does nothing if a process group already exists.
    """
    if dist.is_initialized():
        return
    if "WORLD_SIZE" not in os.environ:
        init_single_process(backend, timeout_s)
        return
    backend = backend or _default_backend()
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(
        backend=backend, timeout=datetime.timedelta(seconds=timeout_s), **init_kwargs
    )


def init_single_process(backend: str | None = None, timeout_s: float = 600.0) -> None:
    """A one-rank process group on an in-memory store: no port to pick, nothing to collide
    with other processes on the machine. Does nothing if a process group already exists."""
    if dist.is_initialized():
        return
    dist.init_process_group(
        backend or _default_backend(),
        store=dist.HashStore(),
        rank=0,
        world_size=1,
        timeout=datetime.timedelta(seconds=timeout_s),
    )


def _default_backend() -> str:
    return "nccl" if cuda_available() else "gloo"
