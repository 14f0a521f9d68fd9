"""Weights of a Hugging Face folder as safetensors files, the way transformers lays them out.

One ``model.safetensors``, or, above ``max_shard_bytes``, ``model-0000i-of-0000n.safetensors``
files plus ``model.safetensors.index.json`` (``weight_map``: tensor name → file). Reading takes
either form and never unpickles: a folder holding only ``pytorch_model.bin`` is refused.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from megatron_longvila.convert.hf_mapping import ConversionError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def _shards(
    tensors: Mapping[str, torch.Tensor], max_shard_bytes: int
) -> list[dict[str, torch.Tensor]]:
    """Tensors in their order, cut into groups of at most ``max_shard_bytes`` (a bigger tensor
    gets a file of its own)."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in tensors.items():
        if shards[-1] and size + _nbytes(tensor) > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += _nbytes(tensor)
    return shards


def save_tensors_file(path: Path, tensors: Mapping[str, torch.Tensor]) -> None:
    """One safetensors file; tensors that are views (of a fused tensor, of each other) are
    copied, since safetensors stores each tensor's own contiguous memory."""
    seen: set[int] = set()
    own = {}
    for name, tensor in tensors.items():
        storage = tensor.untyped_storage().data_ptr()
        shares = storage in seen or tensor.untyped_storage().nbytes() != _nbytes(tensor)
        own[name] = tensor.detach().contiguous().clone() if shares else tensor.detach()
        seen.add(storage)
    try:
        save_file(own, str(path), metadata={"format": "pt"})
    except (OSError, SafetensorError) as error:  # safetensors reports I/O errors as its own
        reason = getattr(error, "strerror", None) or str(error)
        raise OSError(getattr(error, "errno", None), reason, str(path)) from None


def write_safetensors(
    folder: Path,
    tensors: Mapping[str, torch.Tensor],
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    progress: bool = False,
) -> list[str]:
    """Write ``tensors`` into ``folder``; returns the file names written."""
    shards = _shards(tensors, max_shard_bytes)
    names = (
        [SINGLE_FILE]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    bar = tqdm(
        total=len(tensors), desc=f"writing {folder.name}", unit="tensor", disable=not progress
    )
    for name, shard in zip(names, shards):
        save_tensors_file(folder / name, shard)
        bar.update(len(shard))
    bar.close()
    if len(shards) > 1:
        index = {
            "metadata": {"total_size": sum(_nbytes(t) for t in tensors.values())},
            "weight_map": {k: file for file, shard in zip(names, shards) for k in shard},
        }
        (folder / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
        names.append(INDEX_FILE)
    return names


def read_safetensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a Hugging Face weights folder (single file or sharded with an index)."""
    if (folder / INDEX_FILE).is_file():
        weight_map = json.loads((folder / INDEX_FILE).read_text(encoding="utf-8"))["weight_map"]
        files = sorted(set(weight_map.values()))
    elif (folder / SINGLE_FILE).is_file():
        files = [SINGLE_FILE]
    else:
        pickled = sorted(p.name for p in folder.glob("*.bin")) if folder.is_dir() else []
        message = f"{folder}: no {SINGLE_FILE} or {INDEX_FILE}"
        if pickled:
            message += f"; found {pickled}: pickled weights are not read, save them as safetensors"
        raise ConversionError(message)
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        if Path(file).name != file:  # an index must not point outside its folder
            raise ConversionError(f"{folder / INDEX_FILE}: file name {file!r} is not in the folder")
        tensors.update(load_file(str(folder / file)))
    return tensors
