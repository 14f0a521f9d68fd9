"""Load full (TP=1) tensors into a model of any tensor/pipeline-parallel layout.

The model says which part of which tensor each rank holds: its ``sharded_state_dict()`` gives,
for every local parameter, the sharded key and the slice of the global tensor (megatron's own
machinery, so QKV groups, SwiGLU's per-rank ``[gate_r; up_r]`` halves and the tied output layer
of the last pipeline stage come out as megatron lays them out). Each rank reads exactly those
slices from a :class:`FullTensors` source by module name (see :mod:`.names`), which is either a
dict in memory or a safetensors file read slice by slice (memory per rank = its own shard).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Protocol

import torch
from megatron.core.dist_checkpointing.dict_utils import (
    dict_list_map_inplace,
    extract_matching_values,
    nested_values,
)
from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factory_merges
from megatron.core.dist_checkpointing.state_dict_utils import load_preprocess
from tqdm import tqdm

from megatron_longvila.checkpoint.names import module_name
from megatron_longvila.convert.hf_mapping import ConversionError


class FullTensors(Protocol):
    """Full tensors by module name; only the requested slice is materialized."""

    def shape(self, name: str) -> tuple[int, ...] | None:
        """Shape of ``name``, or None if the source has no such tensor."""

    def read(self, name: str, index: tuple[slice, ...]) -> torch.Tensor:
        """``tensor[index]`` of ``name`` (a copy or a view; the caller does not modify it)."""


class TensorsInMemory:
    """A dict of full tensors as a :class:`FullTensors` source."""

    def __init__(self, tensors: Mapping[str, torch.Tensor]) -> None:
        self.tensors = tensors

    def shape(self, name: str) -> tuple[int, ...] | None:
        tensor = self.tensors.get(name)
        return None if tensor is None else tuple(tensor.shape)

    def read(self, name: str, index: tuple[slice, ...]) -> torch.Tensor:
        return self.tensors[name][index]


class TensorsInSafetensorsFile:
    """One safetensors file as a :class:`FullTensors` source; slices are read from the file."""

    def __init__(self, path: str | Path) -> None:
        from safetensors import safe_open

        self.path = Path(path)
        self._file = safe_open(str(self.path), framework="pt")
        self._names = set(self._file.keys())

    def shape(self, name: str) -> tuple[int, ...] | None:
        if name not in self._names:
            return None
        return tuple(self._file.get_slice(name).get_shape())

    def read(self, name: str, index: tuple[slice, ...]) -> torch.Tensor:
        return self._file.get_slice(name)[index]


def _read_shard(sharded: ShardedTensor, source: FullTensors) -> torch.Tensor:
    """This rank's part of ``sharded`` from the full tensor it belongs to, in the model's dtype."""
    n = sharded.prepend_axis_num  # leading layer axis of a layer stack (0 or 1)
    if n > 1:
        raise ConversionError(f"sharded key {sharded.key!r} has {n} leading axes; at most 1 known")
    layer = sharded.global_offset[0] if n else None
    name = module_name(sharded.key, layer)
    expected = tuple(sharded.global_shape[n:])
    found = source.shape(name)
    if found is None:
        raise ConversionError(f"missing tensor {name!r} (the model needs shape {expected})")
    if found != expected:
        raise ConversionError(f"tensor {name!r} has shape {found}, the model needs {expected}")
    index = sharded.global_slice()[n:]
    return source.read(name, index).to(sharded.data.dtype)


def load_full_tensors_into(
    module: torch.nn.Module, source: FullTensors, progress: bool = False
) -> None:
    """Set every parameter of ``module`` (one rank's model chunk, any TP/PP layout) to its slice
    of the full tensors in ``source``; a tensor the model needs but the source lacks, or of
    another shape, raises :class:`ConversionError` naming it and both shapes."""
    sharded, _, factories = load_preprocess(module.sharded_state_dict())
    # ShardedObjects (megatron's empty per-module "_extra_state") stay as the module has them.
    tensors, _ = extract_matching_values(sharded, lambda x: isinstance(x, ShardedTensor))
    bar = tqdm(
        total=sum(1 for _ in nested_values(tensors)),
        desc="loading tensors",
        unit="tensor",
        disable=not progress,
    )

    def read(sharded_tensor: ShardedTensor) -> torch.Tensor:
        bar.update()
        return _read_shard(sharded_tensor, source)

    dict_list_map_inplace(read, tensors)
    bar.close()
    state = apply_factory_merges(tensors, factories)  # e.g. SwiGLU's halves back into one
    result = module.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("_extra_state")]
    if missing or result.unexpected_keys:
        raise ConversionError(
            f"{type(module).__name__}: not loaded {missing}, unexpected {result.unexpected_keys}"
        )
