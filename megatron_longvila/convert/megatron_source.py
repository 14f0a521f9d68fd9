"""Read a megatron dist checkpoint of the LongVILA model: its folder, architecture, tensors.

A checkpoint is named by its root (``latest`` is followed) or by one ``iter_NNNNNNN`` folder.
The architecture and the tokenizer come from its ``train_state.json``:

* ``model_config``: the resolved :class:`LongVILAConfig` as a dict (written by the trainer and
  the converter), else
* ``config``: the trainer's config tree, whose ``model`` section (preset + overrides) is built;
* ``tokenizer_path``, else ``config.data.tokenizer_path``: the tokenizer folder or file;
* ``num_video_frames``, else ``config.data.num_frames`` / ``config.data.fps``.

The model's tensors are read in one process without a process group
(:func:`~megatron_longvila.training.checkpointing.load_full_tensors`), optimizer state is not
read, and come back by module name in the TP=1 layout (see :mod:`.names`). The trainer saves the
model's sharded keys as the model names them (``llm.…``, ``vision_tower.…``, ``mm_projector.…``);
a checkpoint whose keys carry a prefix (``model.llm.…``, from ``sharded_state_dict(prefix=…)``)
is read the same way.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from megatron_longvila.convert.names import unstack_layers
from megatron_longvila.convert.parts import PARTS
from megatron_longvila.models.config import LongVILAConfig
from megatron_longvila.models.hf_mapping import ConversionError
from megatron_longvila.training.checkpointing import (
    FRAMES_KEY,
    MODEL_CONFIG_KEY,
    TOKENIZER_KEY,
    TRAIN_STATE,
    CheckpointManager,
    load_full_tensors,
    verify_checkpoint_metadata,
)


def resolve_checkpoint_dir(path: str | Path) -> Path:
    """The dist checkpoint folder named by ``path``: a root (its ``latest``) or itself."""
    path = Path(path)
    if (path / ".metadata").is_file():
        return path
    latest = CheckpointManager(path).latest_dir()
    if latest is None:
        raise ConversionError(
            f"{path} is neither a dist checkpoint folder (no .metadata) nor a checkpoint root "
            "with a complete iter_NNNNNNN folder"
        )
    return latest


def read_train_state(directory: Path) -> dict[str, Any]:
    """The checkpoint's ``train_state.json``, or {} for a bare dist checkpoint."""
    path = directory / TRAIN_STATE
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def architecture_from_train_state(state: dict[str, Any]) -> LongVILAConfig | None:
    """The model architecture recorded in a train state (see the module docstring), or None."""
    if MODEL_CONFIG_KEY in state:
        return LongVILAConfig.from_dict(state[MODEL_CONFIG_KEY])
    model = (state.get("config") or {}).get("model")
    if model is None:
        return None
    from megatron_longvila.training.config import ModelSection
    from megatron_longvila.training.config_io import from_dict

    return from_dict(ModelSection, model, "model").build()


def tokenizer_from_train_state(state: dict[str, Any]) -> str | None:
    return state.get(TOKENIZER_KEY) or ((state.get("config") or {}).get("data") or {}).get(
        "tokenizer_path"
    )


def frames_from_train_state(state: dict[str, Any]) -> tuple[int | None, float | None]:
    """(frames per video, sampling rate) the model was trained with, where recorded."""
    if FRAMES_KEY in state:
        return int(state[FRAMES_KEY]), state.get("fps")
    data = (state.get("config") or {}).get("data") or {}
    return data.get("num_frames"), data.get("fps")


#: A tensor every LongVILA model has, on the first pipeline stage (and, tied, on the last).
_ANCHOR_KEY = "llm.embedding.word_embeddings.weight"


def model_key_prefix(directory: Path) -> str:
    """What the model's sharded keys start with before ``llm.`` etc.: ``""`` as the trainer saves
    them, e.g. ``"model."`` if they were prefixed. Optimizer state, whose keys embed the model's
    (``optimizer.state.exp_avg.llm.…``), has the longer prefix and is not taken."""
    from torch.distributed.checkpoint import FileSystemReader

    verify_checkpoint_metadata(directory)
    keys = FileSystemReader(str(directory)).read_metadata().state_dict_metadata
    prefixes = [key.removesuffix(_ANCHOR_KEY) for key in keys if key.endswith(_ANCHOR_KEY)]
    if not prefixes:
        raise ConversionError(
            f"{directory} holds no LongVILA model: no key ends with {_ANCHOR_KEY!r} "
            f"({len(keys)} keys, e.g. {sorted(keys)[:3]})"
        )
    return min(prefixes, key=len)


def read_model_tensors(directory: Path) -> dict[str, torch.Tensor]:
    """Every model tensor of a dist checkpoint by module name (TP=1 layout)."""
    prefix = model_key_prefix(directory)
    full: dict[str, torch.Tensor] = {}
    for part in PARTS:
        tensors = load_full_tensors(directory, f"{prefix}{part}.")
        full |= {key.removeprefix(prefix): tensor for key, tensor in tensors.items()}
    return unstack_layers(full)
