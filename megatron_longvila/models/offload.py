"""Activation offload: the tensors chosen layers save for the backward wait in host memory.

Each chosen layer's forward runs under :func:`torch.autograd.graph.save_on_cpu`: every tensor
autograd saves inside it is copied to pinned host memory and copied back when the backward needs
it. On CPU the tensors are host tensors already, so nothing moves and results are unchanged.

megatron-core's own ``cpu_offloading`` is not used: it needs Transformer Engine, refuses pipeline
parallelism and refuses any activation recomputation, including the selective norm
recomputation that :class:`~megatron_longvila.models.config.MemoryConfig` turns on by default.
"""

from __future__ import annotations

import torch

from megatron_longvila.core import platform


def offload_saved_tensors(layers: list[torch.nn.Module]) -> None:
    """Run each module of ``layers`` with its saved tensors kept in host memory."""
    for layer in layers:
        layer.register_forward_pre_hook(_enter)
        layer.register_forward_hook(_exit, always_call=True)


def _enter(module: torch.nn.Module, args: tuple) -> None:
    context = torch.autograd.graph.save_on_cpu(pin_memory=platform.cuda_available())
    context.__enter__()
    module._offload_context = context


def _exit(module: torch.nn.Module, args: tuple, output: object) -> None:
    context = module.__dict__.pop("_offload_context", None)
    if context is not None:
        context.__exit__(None, None, None)
