"""Crash-safe checkpoints: megatron-core dist_checkpointing inside an atomic directory protocol.

Saving (every rank takes part): rank 0 creates ``iter_N.partial``; all ranks write their shards
of the model and optimizer (``dist_checkpointing.save``, resharding-aware) and their own
``rank_XXXXX.safetensors`` (RNG streams, data-loader position); rank 0 writes
``train_state.json`` last, renames the folder to ``iter_N`` and only then replaces ``latest``
(write-temp-then-``os.replace``). A process killed at any point leaves either the previous
``latest`` or the new one, never a half-written checkpoint behind the pointer (layout:
:mod:`.layout`; what is safe to load: :mod:`.safety`).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from safetensors.torch import load_file, save_file

from megatron_longvila.checkpoint import layout
from megatron_longvila.checkpoint.layout import (
    LATEST,
    PARTIAL_SUFFIX,
    TRAIN_STATE,
    CheckpointError,
    iteration_dir_name,
    rank_file_name,
)
from megatron_longvila.checkpoint.safety import load_dist_checkpoint
from megatron_longvila.core.process_lifetime import checkpoint_writer_exits_with_parent


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

    def complete_steps(self) -> list[int]:
        return layout.complete_steps(self.root)

    def latest_dir(self) -> Path | None:
        return layout.latest_dir(self.root)

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

        checkpoint_writer_exits_with_parent()  # a killed rank leaves no writer process behind
        dist_checkpointing.save(sharded_state_dict, str(partial))
        save_rank_state(
            partial / rank_file_name(rank),
            rank_tensors or {},
            {"world_size": dist.get_world_size(), **(rank_meta or {})},
        )
        dist.barrier()

        if rank == 0:
            state = {"step": step, "world_size": dist.get_world_size(), **train_state}
            write_text_atomically(partial / TRAIN_STATE, json.dumps(state, indent=2))
            _fsync_dir(partial)
            self._publish(partial, final)
            self._prune(keep=final)
        dist.barrier()
        return final

    def _publish(self, partial: Path, final: Path) -> None:
        """Make a fully written checkpoint visible: rename, then move the pointer."""
        os.rename(partial, final)
        _fsync_dir(self.root)
        write_text_atomically(self.root / LATEST, final.name + "\n")

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
        train_state = json.loads((target / TRAIN_STATE).read_text(encoding="utf-8"))
        loaded = load_dist_checkpoint(sharded_state_dict, target)
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


def load_model_weights(model: torch.nn.Module, directory: str | Path) -> None:
    """Load a dist checkpoint's model tensors into ``model`` (any TP/SP layout of the saver).

    The keys are the model's own sharded keys; optimizer state saved beside them is not read.
    """
    loaded = load_dist_checkpoint(model.sharded_state_dict(), directory)
    # dist_checkpointing merges the saved common (non-tensor) state into what it returns:
    # from a trainer's checkpoint that includes the optimizer's, which the model has no use for.
    loaded.pop("optimizer", None)
    model.load_state_dict(loaded)


def write_text_atomically(path: Path, text: str) -> None:
    """Replace ``path`` by ``text`` (write a temporary file beside it, fsync, rename): a reader
    or a crash sees the old file or the new one, never a part."""
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
