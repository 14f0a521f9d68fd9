"""CPU adaptations of megatron-core: the spots where it assumes CUDA, made to run on the CPU.

On a machine without CUDA, :func:`adapt_megatron_for_cpu` makes those spots run on the CPU, so
every parallel feature of this project can be tested for real on several gloo processes. Each
adaptation is listed in :data:`ADAPTATIONS`, names the megatron-core function it adapts and says
why. Nothing happens on import: the launcher (trainer, demo, rank pool) makes the explicit call,
and on a CUDA machine the call changes nothing.

Two mechanisms, both scoped to single megatron-core modules:

* a *CPU torch view* installed as the module-global ``torch`` of an adapted module: it answers
  ``torch.cuda.current_device()`` with the CPU device, turns ``torch.cuda.synchronize`` and
  ``empty_cache`` into no-ops, and builds tensors asked for with ``device="cuda"`` on the CPU.
  Every other attribute is the real ``torch``; modules not listed keep the real ``torch``.
* a replaced function or class, where the CUDA assumption is not a device argument (the CUDA RNG
  tracker, a ``param.grad.type() == 'torch.cuda.FloatTensor'`` assertion).
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from megatron_longvila.core import platform

# --------------------------------------------------------------------------------------------
# The CPU torch view
# --------------------------------------------------------------------------------------------

_CPU = torch.device("cpu")


def _on_cpu(device: Any) -> Any:
    """Map any CUDA device spec to the CPU; leave everything else alone."""
    if device is None:
        return None
    if isinstance(device, int):
        return _CPU
    if isinstance(device, str) and device.startswith("cuda"):
        return _CPU
    if isinstance(device, torch.device) and device.type == "cuda":
        return _CPU
    return device


def _device_mapped(factory: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    def build(*args: Any, **kwargs: Any) -> torch.Tensor:
        if "device" in kwargs:
            kwargs["device"] = _on_cpu(kwargs["device"])
        kwargs.pop("pin_memory", None)
        return factory(*args, **kwargs)

    build.__name__ = factory.__name__
    return build


class _CpuCudaNamespace:
    """``torch.cuda`` as seen by an adapted module: the CPU is the current device."""

    @staticmethod
    def current_device() -> torch.device:
        return _CPU

    @staticmethod
    def synchronize(device: Any = None) -> None:
        # CPU ops are synchronous; there is nothing to wait for.
        return None

    @staticmethod
    def empty_cache() -> None:
        return None

    def __getattr__(self, name: str) -> Any:
        return getattr(torch.cuda, name)


class CpuTorchView:
    """The ``torch`` module with CUDA device requests served by the CPU (see module docstring)."""

    _FACTORIES = (
        "zeros",
        "ones",
        "empty",
        "full",
        "tensor",
        "arange",
        "randn",
        "rand",
        "zeros_like",
        "ones_like",
        "empty_like",
    )

    def __init__(self) -> None:
        self.cuda = _CpuCudaNamespace()
        for name in self._FACTORIES:
            setattr(self, name, _device_mapped(getattr(torch, name)))

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)

    def __repr__(self) -> str:
        return "<torch, CPU view (megatron_longvila.core.cpu_adaptations)>"


# --------------------------------------------------------------------------------------------
# CPU RNG tracker
# --------------------------------------------------------------------------------------------


def _cpu_rng_state(device: Any = None, clone: bool = False, graph_safe: bool = False):
    """Stands in for mcore's ``_get_cuda_rng_state``: the 'device' generator is the CPU one."""
    return torch.get_rng_state()


def _make_cpu_rng_tracker_class(base: type) -> type:
    """A subclass of mcore's ``CudaRNGStatesTracker`` whose named states are CPU generator states.

    ``add`` seeds a new CPU state without disturbing the current one; ``fork`` swaps it in and
    out. Dropout in tensor-parallel regions thus draws from the per-TP-rank stream on the CPU just
    as it does on GPUs.
    """

    class CpuRNGStatesTracker(base):  # type: ignore[misc, valid-type]
        def __init__(self, use_cudagraphable_rng: bool = False, **kwargs: Any) -> None:
            super().__init__(use_cudagraphable_rng=False, **kwargs)

        def add(self, name: str, seed: int) -> None:
            self._is_initialized = True
            if seed in self.seeds_:
                raise Exception(f"seed {seed} already exists")
            self.seeds_.add(seed)
            if name in self.states_:
                raise Exception(f"rng state {name} already exists")
            saved = torch.get_rng_state()
            torch.manual_seed(seed)
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(saved)

        @contextlib.contextmanager
        def fork(self, name: str = "model-parallel-rng") -> Iterator[None]:
            if name not in self.states_:
                raise Exception(f"rng state {name} is not added")
            saved = torch.get_rng_state()
            torch.set_rng_state(self.states_[name])
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                torch.set_rng_state(saved)

    CpuRNGStatesTracker.__qualname__ = "CpuRNGStatesTracker"
    return CpuRNGStatesTracker


# --------------------------------------------------------------------------------------------
# CPU replacement for clip_grad_by_total_norm_fp32
# --------------------------------------------------------------------------------------------


def _clip_grad_by_total_norm_fp32_cpu(
    parameters: Any, max_norm: float, total_norm: float, use_decoupled_grad: bool = False
) -> None:
    """mcore's ``clip_grad_by_total_norm_fp32`` without its CUDA tensor-type assertion."""
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    attr = "decoupled_grad" if use_decoupled_grad else "grad"
    clip_coeff = max_norm / (total_norm + 1.0e-6)
    if clip_coeff >= 1.0:
        return
    for param in parameters:
        grad = getattr(param, attr, None)
        if grad is not None:
            grad.detach().mul_(clip_coeff)


# --------------------------------------------------------------------------------------------
# CPU wrappers for LanguageModule.setup_embeddings_and_output_layer and the bf16 optimizer
# --------------------------------------------------------------------------------------------


def _keep_tensors_on_cpu_during(method: Callable[..., Any]) -> Callable[..., Any]:
    """``method`` with ``Tensor.cuda()`` answering the tensor itself while it runs.

    mcore moves the last pipeline stage's copy of a tied embedding with ``weight.data.cuda()``
    before all-reducing it with the first stage's; on CPU the copy stays where it is. The swap
    lasts only for the call (model construction, single-threaded).
    """

    def on_cpu(*args: Any, **kwargs: Any) -> Any:
        original_cuda = torch.Tensor.cuda
        torch.Tensor.cuda = lambda tensor, *a, **k: tensor  # type: ignore[method-assign]
        try:
            return method(*args, **kwargs)
        finally:
            torch.Tensor.cuda = original_cuda  # type: ignore[method-assign]

    on_cpu.__name__ = method.__name__
    return on_cpu


def _cuda_type_names_during(method: Callable[..., Any]) -> Callable[..., Any]:
    """``method`` with ``Tensor.type()`` answering CUDA type names for CPU tensors while it runs.

    mcore's mixed-precision optimizer sorts its parameters by ``param.type()`` (``"torch.cuda.
    BFloat16Tensor"`` gets an fp32 main copy, ``"torch.cuda.FloatTensor"`` stays) and refuses any
    other name; a CPU bf16 parameter answers ``"torch.BFloat16Tensor"``. The swap lasts only for
    the call (optimizer construction, single-threaded) and only the no-argument form changes.
    """

    def on_cpu(*args: Any, **kwargs: Any) -> Any:
        original_type = torch.Tensor.type

        def type_name(tensor: torch.Tensor, *a: Any, **k: Any) -> Any:
            name = original_type(tensor, *a, **k)
            if a or k or tensor.device.type != "cpu":
                return name
            return name.replace("torch.", "torch.cuda.", 1)

        torch.Tensor.type = type_name  # type: ignore[method-assign]
        try:
            return method(*args, **kwargs)
        finally:
            torch.Tensor.type = original_type  # type: ignore[method-assign]

    on_cpu.__name__ = method.__name__
    return on_cpu


# --------------------------------------------------------------------------------------------
# CPU replacement for get_pos_emb_on_this_cp_rank
# --------------------------------------------------------------------------------------------


def _pos_emb_on_this_cp_rank_cpu(
    pos_emb: torch.Tensor, seq_dim: int, cp_group: dist.ProcessGroup
) -> torch.Tensor:
    """mcore's ``get_pos_emb_on_this_cp_rank`` with its chunk index built on the embedding's device.

    Keeps chunks ``r`` and ``2·cp−1−r`` of ``2·cp`` along ``seq_dim`` (the zigzag split of context
    parallelism); mcore builds that two-element index in pinned memory and calls ``.cuda()``.
    """
    if cp_group is None:
        raise ValueError("cp_group must be provided to slice the positional embedding per CP rank")
    size, rank = cp_group.size(), cp_group.rank()
    index = torch.tensor([rank, 2 * size - 1 - rank], device=pos_emb.device)
    before, after = pos_emb.shape[:seq_dim], pos_emb.shape[seq_dim + 1 :]
    chunks = pos_emb.view(*before, 2 * size, -1, *after).index_select(seq_dim, index)
    return chunks.view(*before, -1, *after)


def _checkpoint_without_output_init_without_te(original: Callable[..., None]):
    """``CheckpointWithoutOutput(fp8=False)`` takes any value but None as "fp8 on" and then asks
    Transformer Engine's FP8 state manager, which is absent: there is no fp8 without it."""

    def __init__(self, fp8: Any = None) -> None:
        original(self, fp8=None)

    return __init__


# --------------------------------------------------------------------------------------------
# The adaptations
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Adaptation:
    """One CPU adaptation of a megatron-core spot.

    ``module`` is the megatron-core module; ``attribute`` the global replaced in it (``torch``
    for the CPU view), or the method replaced in its class ``owner``; ``adapts`` names the
    functions that need it; ``why`` says what fails without it.
    """

    name: str
    module: str
    attribute: str
    adapts: tuple[str, ...]
    why: str
    replacement: Callable[[Any], Any]  # original value -> replacement
    owner: str | None = None  # a class in `module` whose attribute is replaced

    def target(self) -> Any:
        """The object whose ``attribute`` is replaced: the module, or its class ``owner``."""
        module = importlib.import_module(self.module)
        return module if self.owner is None else getattr(module, self.owner)


# (name, megatron-core module, functions that need the CPU view, what they do with CUDA)
_CPU_VIEW_SPOTS: tuple[tuple[str, str, tuple[str, ...], str], ...] = (
    (
        "rotary_embedding_device",
        "megatron.core.models.common.embeddings.rotary_pos_embedding",
        ("RotaryEmbedding.__init__", "RotaryEmbedding.forward"),
        "inv_freq is placed on torch.cuda.current_device()",
    ),
    (
        "global_memory_buffer_device",
        "megatron.core.utils",
        ("GlobalMemoryBuffer.get_tensor", "local_multi_tensor_l2_norm"),
        "buffers and the l2-norm result are allocated on CUDA",
    ),
    (
        "default_causal_mask_device",
        "megatron.core.transformer.utils",
        ("get_default_causal_mask", "get_sliding_window_causal_mask"),
        "the mask of the local DotProductAttention is built with device='cuda'",
    ),
    (
        "tensor_parallel_mappings_device",
        "megatron.core.tensor_parallel.mappings",
        ("_gather_along_last_dim", "_gather_along_first_dim", "_AllToAll.forward"),
        "gather outputs are allocated on torch.cuda.current_device()",
    ),
    (
        "tensor_parallel_layers_device",
        "megatron.core.tensor_parallel.layers",
        ("LinearWithGradAccumulationAndAsyncCommunication.backward",),
        "with TP sequence parallelism the reduce-scattered input gradient of a column-parallel "
        "linear is allocated on torch.cuda.current_device()",
    ),
    (
        "pipeline_schedules_device",
        "megatron.core.pipeline_parallel.schedules",
        (
            "forward_backward_no_pipelining",
            "forward_backward_pipelining_without_interleaving",
            "forward_backward_pipelining_with_interleaving",
        ),
        "the token counter is built with device='cuda'",
    ),
    (
        "p2p_communication_device",
        "megatron.core.pipeline_parallel.p2p_communication",
        ("P2PCommunicator._communicate", "P2PCommunicator._communicate_shapes"),
        "receive buffers go to torch.cuda.current_device(); variable_seq_lengths and "
        "batch_p2p_sync call torch.cuda.synchronize()",
    ),
    (
        "param_and_grad_buffer_device",
        "megatron.core.distributed.param_and_grad_buffer",
        ("_ParamAndGradBuffer.__init__",),
        "the contiguous param/grad buffers are allocated on torch.cuda.current_device()",
    ),
    (
        "optimizer_device",
        "megatron.core.optimizer.optimizer",
        ("MixedPrecisionOptimizer.__init__", "FP32Optimizer.__init__"),
        "found_inf, loss-scale and overflow buffers are built with device='cuda'",
    ),
    (
        "clip_grads_device",
        "megatron.core.optimizer.clip_grads",
        ("get_grad_norm_fp32", "count_zeros_fp32"),
        "norm and zero-count accumulators are built with device='cuda'",
    ),
    (
        "checkpoint_writer_device",
        "megatron.core.dist_checkpointing.strategies.filesystem_async",
        ("FileSystemWriterAsync.preload_tensors",),
        "calls torch.cuda.synchronize() after staging tensors",
    ),
    (
        "checkpoint_saver_device",
        "megatron.core.dist_checkpointing.strategies.state_dict_saver",
        ("save_state_dict_async_plan", "save_state_dict_async_finalize"),
        "the cross-rank failure and plan-reuse flags are all-reduced as CUDA tensors",
    ),
    (
        "checkpoint_async_device",
        "megatron.core.dist_checkpointing.strategies.async_utils",
        ("AsyncCaller.sync_all_async_calls", "AsyncCallsQueue.maybe_finalize_async_calls"),
        "liveness flags are CUDA tensors; scheduling calls torch.cuda.synchronize()",
    ),
)

_view = CpuTorchView()
_torch_view: Callable[[Any], Any] = lambda original: _view

ADAPTATIONS: tuple[Adaptation, ...] = (
    Adaptation(
        name="rng_tracker",
        module="megatron.core.tensor_parallel.random",
        attribute="CudaRNGStatesTracker",
        adapts=(
            "model_parallel_cuda_manual_seed",
            "get_cuda_rng_tracker",
            "initialize_rng_tracker",
        ),
        why="the tracker seeds and swaps torch.cuda generator states, absent without CUDA",
        replacement=_make_cpu_rng_tracker_class,
    ),
    Adaptation(
        name="get_cuda_rng_state",
        module="megatron.core.tensor_parallel.random",
        attribute="_get_cuda_rng_state",
        adapts=("CheckpointFunction", "_get_all_rng_states"),
        why="activation recomputation saves the CUDA generator state to replay dropout",
        replacement=lambda original: _cpu_rng_state,
    ),
    *(
        Adaptation(
            name=name,
            module=module,
            attribute="torch",
            adapts=adapts,
            why=why,
            replacement=_torch_view,
        )
        for name, module, adapts, why in _CPU_VIEW_SPOTS
    ),
    Adaptation(
        name="tied_embedding_setup_device",
        module="megatron.core.models.common.language_module.language_module",
        owner="LanguageModule",
        attribute="setup_embeddings_and_output_layer",
        adapts=("LanguageModule.setup_embeddings_and_output_layer",),
        why="with pipeline stages and tied embeddings, the last stage's copy is moved with "
        "Tensor.cuda() before it is synchronized with the first stage's",
        replacement=_keep_tensors_on_cpu_during,
    ),
    Adaptation(
        name="rope_cp_slice",
        # RoPE imported the function by name, so it is replaced where RoPE looks it up.
        module="megatron.core.models.common.embeddings.rotary_pos_embedding",
        attribute="get_pos_emb_on_this_cp_rank",
        adapts=("RotaryEmbedding.forward", "MultimodalRotaryEmbedding.forward"),
        why="with context parallelism the zigzag chunk index is built in pinned memory and "
        "moved with .cuda()",
        replacement=lambda original: _pos_emb_on_this_cp_rank_cpu,
    ),
    Adaptation(
        name="recompute_norm_without_te",
        module="megatron.core.tensor_parallel.random",
        owner="CheckpointWithoutOutput",
        attribute="__init__",
        adapts=("TransformerLayer._forward_attention", "TransformerLayer._forward_mlp"),
        why="the selective 'layernorm' recomputation builds CheckpointWithoutOutput() whose "
        "default fp8=False counts as fp8 on and reaches Transformer Engine's FP8GlobalStateManager",
        replacement=_checkpoint_without_output_init_without_te,
    ),
    Adaptation(
        name="float16_optimizer_param_types",
        module="megatron.core.optimizer.optimizer",
        owner="Float16OptimizerWithFloat16Params",
        attribute="__init__",
        adapts=("Float16OptimizerWithFloat16Params.__init__",),
        why="sorts bf16/fp16 and fp32 parameters by param.type() == 'torch.cuda.BFloat16Tensor' "
        "/ 'torch.cuda.FloatTensor' and refuses every other type name",
        replacement=_cuda_type_names_during,
    ),
    Adaptation(
        name="clip_grad_by_total_norm_fp32",
        module="megatron.core.optimizer.optimizer",
        attribute="clip_grad_by_total_norm_fp32",
        adapts=("MegatronOptimizer.clip_grad_norm", "ChainedOptimizer.step_with_ready_grads"),
        why="asserts param.grad.type() == 'torch.cuda.FloatTensor'",
        replacement=lambda original: _clip_grad_by_total_norm_fp32_cpu,
    ),
)

_originals: dict[str, Any] = {}


def adaptations_active() -> bool:
    return bool(_originals)


def _selected(names: tuple[str, ...] | None) -> list[Adaptation]:
    if names is None:
        return list(ADAPTATIONS)
    known = {a.name for a in ADAPTATIONS}
    unknown = sorted(set(names) - known)
    if unknown:
        raise ValueError(f"unknown adaptation(s) {unknown}; known: {sorted(known)}")
    return [a for a in ADAPTATIONS if a.name in names]


def adapt_megatron_for_cpu(force: bool = False, names: tuple[str, ...] | None = None) -> bool:
    """Apply the adaptations in :data:`ADAPTATIONS` (all, or those ``names``); idempotent.

    Does nothing when CUDA is available, unless ``force`` is set (tests use it). Returns whether
    the adaptations are active after the call.
    """
    if platform.cuda_available() and not force:
        return False
    for adaptation in _selected(names):
        if adaptation.name in _originals:
            continue
        target = adaptation.target()
        original = getattr(target, adaptation.attribute)
        _originals[adaptation.name] = original
        setattr(target, adaptation.attribute, adaptation.replacement(original))
    _reset_rng_tracker()
    return True


def undo_megatron_adaptations(names: tuple[str, ...] | None = None) -> None:
    """Restore the adapted megatron-core attributes (all, or those ``names``; used by tests)."""
    for adaptation in reversed(_selected(names)):
        if adaptation.name not in _originals:
            continue
        setattr(adaptation.target(), adaptation.attribute, _originals.pop(adaptation.name))
    _reset_rng_tracker()


def _reset_rng_tracker() -> None:
    """Drop any tracker built before the change so the next one is built of the right class."""
    from megatron.core.tensor_parallel import random as mcore_random

    mcore_random._CUDA_RNG_STATE_TRACKER = None
    mcore_random._CUDA_RNG_STATE_TRACKER_INITIALIZED = False
