"""A dist checkpoint's tensors read whole, in one process without a process group.

For conversion, comparisons and inspection. Tensors come back full (the TP=1 layout: megatron's
sharding metadata puts QKV groups and SwiGLU halves back together) and by module name
(:mod:`.names`); optimizer state is not read.
"""

from __future__ import annotations

from pathlib import Path

import torch

from megatron_longvila.checkpoint.layout import CheckpointError
from megatron_longvila.checkpoint.names import unstack_layers
from megatron_longvila.checkpoint.safety import verify_checkpoint_metadata
from megatron_longvila.models.config import MODULES

#: A tensor every LongVILA model has, on the first pipeline stage (and, tied, on the last).
_ANCHOR_KEY = "llm.embedding.word_embeddings.weight"


def load_full_tensors(directory: str | Path, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every tensor of a dist checkpoint whose key starts with ``prefix``, as full CPU tensors.

    Per-layer tensors of a megatron layer stack come back stacked, ``[layers, ...]``.
    """
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint import load as dcp_load
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    directory = Path(directory)
    verify_checkpoint_metadata(directory)
    reader = FileSystemReader(str(directory))
    metadata = reader.read_metadata()
    state = {
        key: torch.empty(meta.size, dtype=meta.properties.dtype)
        for key, meta in metadata.state_dict_metadata.items()
        if isinstance(meta, TensorStorageMetadata) and key.startswith(prefix)
    }
    if not state:
        raise CheckpointError(f"{directory} holds no tensors under {prefix!r}")
    dcp_load(state, storage_reader=reader, no_dist=True)
    return state


def model_key_prefix(directory: Path) -> str:
    """What the model's sharded keys start with before ``llm.`` etc.: ``""`` as the trainer saves
    them, e.g. ``"model."`` if they were prefixed. Optimizer state, whose keys embed the model's
    (``optimizer.state.exp_avg.llm.…``), has the longer prefix and is not taken."""
    from torch.distributed.checkpoint import FileSystemReader

    verify_checkpoint_metadata(directory)
    keys = FileSystemReader(str(directory)).read_metadata().state_dict_metadata
    prefixes = [key.removesuffix(_ANCHOR_KEY) for key in keys if key.endswith(_ANCHOR_KEY)]
    if not prefixes:
        raise CheckpointError(
            f"{directory} holds no LongVILA model: no key ends with {_ANCHOR_KEY!r} "
            f"({len(keys)} keys, e.g. {sorted(keys)[:3]})"
        )
    return min(prefixes, key=len)


def read_model_tensors(directory: Path) -> dict[str, torch.Tensor]:
    """Every model tensor of a dist checkpoint by module name (TP=1 layout)."""
    prefix = model_key_prefix(directory)
    full: dict[str, torch.Tensor] = {}
    for module in MODULES:
        tensors = load_full_tensors(directory, f"{prefix}{module}.")
        full |= {key.removeprefix(prefix): tensor for key, tensor in tensors.items()}
    return unstack_layers(full)
