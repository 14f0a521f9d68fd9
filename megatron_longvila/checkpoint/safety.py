"""Loading never unpickles arbitrary objects.

The one pickled file of megatron-core's torch_dist format, ``.metadata``, is read with an
allow-list unpickler before megatron-core reads it: only torch's and megatron's checkpoint
metadata classes, dtypes and a few builtins resolve, never a function to call. Common state is
loaded by torch with ``weights_only=True``; our own files are JSON and safetensors.
"""

from __future__ import annotations

import importlib
import io
import pickle
from pathlib import Path
from typing import Any

import torch

from megatron_longvila.checkpoint.layout import METADATA, CheckpointError

_SAFE_MODULE_PREFIXES = (
    "torch.distributed.checkpoint.",
    "megatron.core.dist_checkpointing.",
)
_SAFE_GLOBALS = {
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("collections", "OrderedDict"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
    ("builtins", "slice"),
}


class _AllowListUnpickler(pickle.Unpickler):
    """Resolves only metadata classes of torch's checkpoint format, dtypes and a few builtins."""

    def find_class(self, module: str, name: str) -> Any:
        obj = super().find_class(module, name) if self._allowed(module, name) else None
        if obj is None:
            raise CheckpointError(
                f"checkpoint metadata refers to {module}.{name}, which is not an allowed type"
            )
        return obj

    @staticmethod
    def _allowed(module: str, name: str) -> bool:
        if (module, name) in _SAFE_GLOBALS:
            return True
        if module == "torch":
            return isinstance(getattr(torch, name, None), torch.dtype)
        if module.startswith(_SAFE_MODULE_PREFIXES):
            # Classes only (metadata dataclasses and enums): never a function to call.
            return isinstance(getattr(importlib.import_module(module), name, None), type)
        return False


def verify_checkpoint_metadata(directory: str | Path) -> None:
    """Refuse a torch_dist checkpoint whose pickled ``.metadata`` holds anything but metadata."""
    path = Path(directory) / METADATA
    if not path.is_file():
        raise CheckpointError(f"{directory} is not a complete dist checkpoint (no {METADATA})")
    with path.open("rb") as handle:
        _AllowListUnpickler(io.BufferedReader(handle)).load()
