"""Crash-safe checkpoints: megatron-core dist_checkpointing inside an atomic directory protocol.

Layout of a checkpoint root::

    root/
      iter_0000008/              complete: dist checkpoint + train_state.json + rank_*.safetensors
      iter_0000012.partial/      being written (or left behind by a crash): never loaded
      latest                     text file naming the newest complete checkpoint

Saving (every rank takes part): rank 0 creates ``iter_N.partial``; all ranks write their shards
of the model and optimizer (``dist_checkpointing.save``, resharding-aware) and their own
``rank_XXXXX.safetensors`` (RNG streams, data-loader position); rank 0 writes
``train_state.json`` last, renames the folder to ``iter_N`` and only then replaces ``latest``
(write-temp-then-``os.replace``). A process killed at any point leaves either the previous
``latest`` or the new one, never a half-written checkpoint behind the pointer.

Loading never unpickles arbitrary objects: the one pickled file of the torch_dist format
(``.metadata``) is checked with an allow-list unpickler before megatron-core reads it; common
state is loaded by torch with ``weights_only=True``; our own files are JSON and safetensors.
"""

from __future__ import annotations

import importlib
import io
import json
import os
import pickle
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from safetensors.torch import load_file, save_file

LATEST = "latest"
TRAIN_STATE = "train_state.json"
#: ``train_state.json`` entries that describe the model without the training config, read by
#: inference and the converter: the resolved architecture (``LongVILAConfig.to_dict()``, with
#: the tokenizer's media token ids), the tokenizer folder or file, the chat template and the
#: frames per video it was trained with.
MODEL_CONFIG_KEY = "model_config"
TOKENIZER_KEY = "tokenizer_path"
CHAT_TEMPLATE_KEY = "chat_template"
FRAMES_KEY = "num_video_frames"
PARTIAL_SUFFIX = ".partial"
_ITER_RE = re.compile(r"^iter_(\d{7})$")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or not loadable."""


def iteration_dir_name(step: int) -> str:
    return f"iter_{step:07d}"


def rank_file_name(rank: int) -> str:
    return f"rank_{rank:05d}.safetensors"


# ---- safe metadata check ----------------------------------------------------------------------

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
    path = Path(directory) / ".metadata"
    if not path.is_file():
        raise CheckpointError(f"{directory} is not a complete dist checkpoint (no .metadata)")
    with path.open("rb") as handle:
        _AllowListUnpickler(io.BufferedReader(handle)).load()


def load_full_tensors(directory: str | Path, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every tensor of a dist checkpoint whose key starts with ``prefix``, as full CPU tensors.

    Runs in one process without a process group (conversion, comparisons, inspection).
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


# ---- per-rank state ---------------------------------------------------------------------------


def save_rank_state(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    save_file(
        {k: v.detach().cpu().contiguous() for k, v in tensors.items()},
        str(path),
        metadata={"json": json.dumps(meta)},
    )


def load_rank_state(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        meta = json.loads((handle.metadata() or {}).get("json", "{}"))
    return load_file(str(path)), meta


# ---- the manager ------------------------------------------------------------------------------


@dataclass
class LoadedCheckpoint:
    directory: Path
    step: int
    sharded: dict[str, Any]  # what dist_checkpointing.load returned
    train_state: dict[str, Any]  # train_state.json
    rank_tensors: dict[str, torch.Tensor] | None  # this rank's file, if the world matched
    rank_meta: dict[str, Any] | None


class CheckpointManager:
    """Saves and finds checkpoints under ``root`` (see module docstring)."""

    def __init__(self, root: str | Path, keep_last: int = 2) -> None:
        if keep_last < 1:
            raise ValueError(f"keep_last must be >= 1, got {keep_last}")
        self.root = Path(root)
        self.keep_last = keep_last

    # ---- discovery --------------------------------------------------------------------------
    def complete_steps(self) -> list[int]:
        if not self.root.is_dir():
            return []
        steps = []
        for child in self.root.iterdir():
            match = _ITER_RE.match(child.name)
            if match and (child / TRAIN_STATE).is_file():
                steps.append(int(match.group(1)))
        return sorted(steps)

    def latest_dir(self) -> Path | None:
        """The checkpoint ``latest`` points to; falls back to the newest complete one."""
        pointer = self.root / LATEST
        if pointer.is_file():
            candidate = self.root / pointer.read_text(encoding="utf-8").strip()
            if (candidate / TRAIN_STATE).is_file():
                return candidate
        steps = self.complete_steps()
        return self.root / iteration_dir_name(steps[-1]) if steps else None

    # ---- save -------------------------------------------------------------------------------
    def save(
        self,
        step: int,
        sharded_state_dict: dict[str, Any],
        train_state: dict[str, Any],
        rank_tensors: dict[str, torch.Tensor] | None = None,
        rank_meta: dict[str, Any] | None = None,
    ) -> Path:
        """Write checkpoint ``step`` on every rank; returns its final directory."""
        rank = dist.get_rank()
        final = self.root / iteration_dir_name(step)
        partial = final.with_name(final.name + PARTIAL_SUFFIX)
        if rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            if partial.exists():
                shutil.rmtree(partial)
            if final.exists():  # re-saving a step (e.g. after a resume): replace it atomically
                shutil.rmtree(final)
            partial.mkdir()
        dist.barrier()

        dist_checkpointing.save(sharded_state_dict, str(partial))
        save_rank_state(
            partial / rank_file_name(rank),
            rank_tensors or {},
            {"world_size": dist.get_world_size(), **(rank_meta or {})},
        )
        dist.barrier()

        if rank == 0:
            state = {"step": step, "world_size": dist.get_world_size(), **train_state}
            _write_atomically(partial / TRAIN_STATE, json.dumps(state, indent=2))
            _fsync_dir(partial)
            self._publish(partial, final)
            self._prune(keep=final)
        dist.barrier()
        return final

    def _publish(self, partial: Path, final: Path) -> None:
        """Make a fully written checkpoint visible: rename, then move the pointer."""
        os.rename(partial, final)
        _fsync_dir(self.root)
        _write_atomically(self.root / LATEST, final.name + "\n")

    def _prune(self, keep: Path) -> None:
        for old in self.complete_steps()[: -self.keep_last]:
            path = self.root / iteration_dir_name(old)
            if path != keep:
                shutil.rmtree(path, ignore_errors=True)
        for child in self.root.iterdir():
            if child.name.endswith(PARTIAL_SUFFIX):
                shutil.rmtree(child, ignore_errors=True)

    # ---- load -------------------------------------------------------------------------------
    def load(
        self, sharded_state_dict: dict[str, Any], directory: str | Path | None = None
    ) -> LoadedCheckpoint:
        """Load into the layout described by ``sharded_state_dict`` (any TP/PP/SP of the saver).

        Per-rank state comes back only when the saving world had the same size (the same rank
        then means the same place in the topology); otherwise it is ``None`` and the caller
        re-derives RNG streams from the seed and step.
        """
        target = Path(directory) if directory is not None else self.latest_dir()
        if target is None:
            raise CheckpointError(f"no complete checkpoint under {self.root}")
        if not (target / TRAIN_STATE).is_file():
            raise CheckpointError(f"{target} is incomplete (no {TRAIN_STATE}); refusing to load it")
        verify_checkpoint_metadata(target)
        train_state = json.loads((target / TRAIN_STATE).read_text(encoding="utf-8"))
        loaded = dist_checkpointing.load(sharded_state_dict, str(target))
        rank_tensors = rank_meta = None
        rank_path = target / rank_file_name(dist.get_rank())
        if train_state.get("world_size") == dist.get_world_size() and rank_path.is_file():
            rank_tensors, rank_meta = load_rank_state(rank_path)
        return LoadedCheckpoint(
            directory=target,
            step=int(train_state["step"]),
            sharded=loaded,
            train_state=train_state,
            rank_tensors=rank_tensors,
            rank_meta=rank_meta,
        )


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with tmp.open("w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
