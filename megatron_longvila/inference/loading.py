"""Load a LongVILA model for inference from a checkpoint path: one function for every layout.

:func:`load_model_for_inference` accepts

* a checkpoint root of :class:`~megatron_longvila.training.checkpointing.CheckpointManager`
  (its ``latest`` checkpoint is taken), or one ``iter_NNNNNNN`` folder of it;
* a bare megatron-core dist checkpoint folder (``.metadata`` inside, e.g. from
  ``dist_checkpointing.save``);
* a Hugging Face LongVILA folder (``llm/``, ``vision_tower/``, ``mm_projector/``,
  ``config.json``), read by the checkpoint converter (:mod:`megatron_longvila.convert`), with
  tensor-parallel size 1.

Megatron checkpoints load into any tensor-parallel / MM-SP layout (megatron-core reshards on
load). The architecture comes from the checkpoint's ``train_state.json`` unless the caller passes
a :class:`~megatron_longvila.models.config.LongVILAConfig`: key :data:`MODEL_CONFIG_KEY`, the
resolved architecture the trainer (and :func:`inference_metadata`) records. So do the tokenizer
and chat template, which only the generation front end (CLI, :class:`~.generator.Generator`)
needs. The dict nesting of the saved
state (the trainer's ``{"model": ...}``) does not matter: dist checkpoints store tensors by their
sharded keys.

Loading never unpickles arbitrary objects: the dist checkpoint's ``.metadata`` passes the
allow-list check of :func:`~megatron_longvila.training.checkpointing.verify_checkpoint_metadata`
before megatron-core reads it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from megatron.core import dist_checkpointing, parallel_state

from megatron_longvila.convert.hf_source import (
    HFSource,
    read_longvila_config,
    read_longvila_weights,
)
from megatron_longvila.models.config import LongVILAConfig
from megatron_longvila.models.hf_mapping import load_full_state
from megatron_longvila.models.longvila import LongVILAModel
from megatron_longvila.models.longvila_step import build_longvila_model
from megatron_longvila.training.checkpointing import (
    CHAT_TEMPLATE_KEY,
    MODEL_CONFIG_KEY,
    TOKENIZER_KEY,
    TRAIN_STATE,
    CheckpointError,
    CheckpointManager,
    verify_checkpoint_metadata,
)

HF_PARTS = ("llm", "vision_tower", "mm_projector")


def inference_metadata(
    cfg: LongVILAConfig, tokenizer_path: str | Path | None = None, chat_template: str | None = None
) -> dict[str, Any]:
    """Entries for a checkpoint's ``train_state`` (``CheckpointManager.save(..., train_state=)``)
    that let inference rebuild the model and its prompt format from the checkpoint alone."""
    meta: dict[str, Any] = {MODEL_CONFIG_KEY: cfg.to_dict()}
    if tokenizer_path is not None:
        meta[TOKENIZER_KEY] = str(tokenizer_path)
    if chat_template is not None:
        meta[CHAT_TEMPLATE_KEY] = chat_template
    return meta


@dataclass
class CheckpointSource:
    """What a checkpoint path resolved to.

    kind: "megatron" (a dist checkpoint folder) or "hf" (a Hugging Face LongVILA folder).
    directory: that folder.
    config: the architecture (None when the checkpoint does not record it).
    tokenizer_path, chat_template: as recorded, else None.
    """

    kind: str
    directory: Path
    config: LongVILAConfig | None
    tokenizer_path: str | None = None
    chat_template: str | None = None


def is_hf_folder(path: Path) -> bool:
    return (path / "config.json").is_file() and all((path / p).is_dir() for p in HF_PARTS)


def resolve_checkpoint(path: str | Path) -> CheckpointSource:
    """Find the checkpoint under ``path`` and what it records (no process group needed)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint path {path} does not exist")
    if is_hf_folder(path):
        return _hf_source(path)
    directory = path
    if not (path / ".metadata").is_file():
        latest = CheckpointManager(path).latest_dir()
        if latest is None:
            raise CheckpointError(
                f"{path} holds no checkpoint: neither a dist checkpoint (.metadata), a checkpoint "
                f"root with complete iter_* folders, nor a Hugging Face folder "
                f"({', '.join(f'{p}/' for p in HF_PARTS)}, config.json)"
            )
        directory = latest
    state_file = directory / TRAIN_STATE
    state = json.loads(state_file.read_text(encoding="utf-8")) if state_file.is_file() else {}
    config = state.get(MODEL_CONFIG_KEY)
    return CheckpointSource(
        kind="megatron",
        directory=directory,
        config=None if config is None else LongVILAConfig.from_dict(config),
        tokenizer_path=state.get(TOKENIZER_KEY),
        chat_template=state.get(CHAT_TEMPLATE_KEY),
    )


def _hf_source(folder: Path) -> CheckpointSource:
    """A Hugging Face LongVILA folder, its architecture read by the checkpoint converter."""
    try:
        settings = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        config = read_longvila_config(HFSource.from_folder(folder))
    except (OSError, ValueError) as exc:  # ConversionError and JSONDecodeError included
        raise CheckpointError(
            f"{folder} is not a readable Hugging Face LongVILA folder: {exc}"
        ) from None
    return CheckpointSource(
        kind="hf",
        directory=folder,
        config=config,
        tokenizer_path=str(folder / "llm"),
        chat_template=settings.get(CHAT_TEMPLATE_KEY),
    )


def load_model_for_inference(
    path: str | Path,
    *,
    model_config: LongVILAConfig | None = None,
    params_dtype: torch.dtype = torch.float32,
) -> tuple[LongVILAModel, CheckpointSource]:
    """This rank's whole LongVILA model with the weights of the checkpoint at ``path``, in eval
    mode, for the megatron-core layout already initialized (``initialize_mmsp``: any tp and
    ulysses × ring, pipeline size 1).

    ``model_config`` overrides the architecture the checkpoint records (and is required when it
    records none). Returns the model and what ``path`` resolved to (its ``config`` is the one
    used).
    """
    if parallel_state.get_pipeline_model_parallel_world_size() != 1:
        raise ValueError(
            f"inference runs with pipeline-parallel size 1, got "
            f"{parallel_state.get_pipeline_model_parallel_world_size()}; use tp and sp instead"
        )
    source = resolve_checkpoint(path)
    if model_config is not None:
        source.config = model_config
    if source.config is None:
        raise CheckpointError(
            f"{source.directory} does not record the model architecture ({TRAIN_STATE} has no "
            f"{MODEL_CONFIG_KEY!r}); pass model_config (CLI: --model-preset)"
        )
    (model,) = build_longvila_model(source.config, params_dtype=params_dtype)
    if source.kind == "hf":
        if parallel_state.get_tensor_model_parallel_world_size() != 1:
            raise CheckpointError(
                f"{source.directory}: Hugging Face folders load with tensor-parallel size 1; "
                "convert to a Megatron checkpoint for other layouts"
            )
        hf = HFSource.from_folder(source.directory)
        load_full_state(model, read_longvila_weights(hf, read_longvila_config(hf)))
    else:
        verify_checkpoint_metadata(source.directory)
        loaded = dist_checkpointing.load(model.sharded_state_dict(), str(source.directory))
        # dist_checkpointing merges the saved common (non-tensor) state into what it returns:
        # from a trainer's checkpoint that includes the optimizer's, which the model has no use for.
        loaded.pop("optimizer", None)
        model.load_state_dict(loaded)
    model.eval()
    return model, source
