"""Load a LongVILA model for inference from a checkpoint path: one function for every layout.

:func:`load_model_for_inference` accepts

* a checkpoint root (its ``latest`` checkpoint is taken), one ``iter_NNNNNNN`` folder of it, or
  a bare megatron-core dist checkpoint folder (see :mod:`megatron_longvila.checkpoint`);
* a Hugging Face LongVILA folder (``llm/``, ``vision_tower/``, ``mm_projector/``,
  ``config.json``), read by the checkpoint converter (:mod:`megatron_longvila.convert`), with
  tensor-parallel size 1. ``token_order`` gives its projector's token order when the folder
  cannot tell it (:func:`~megatron_longvila.convert.hf_source.projector_token_order`).

Megatron checkpoints load into any tensor-parallel / MM-SP layout (megatron-core reshards on
load). The architecture, tokenizer and chat template come from what the checkpoint records
(:mod:`megatron_longvila.checkpoint.train_state`) unless the caller passes a
:class:`~megatron_longvila.models.config.LongVILAConfig`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from megatron.core import parallel_state

from megatron_longvila.checkpoint.layout import (
    TRAIN_STATE,
    CheckpointError,
    resolve_checkpoint_dir,
)
from megatron_longvila.checkpoint.manager import load_model_weights
from megatron_longvila.checkpoint.train_state import (
    CHAT_TEMPLATE_KEY,
    MODEL_CONFIG_KEY,
    chat_template_from_train_state,
    read_train_state,
    tokenizer_from_train_state,
)
from megatron_longvila.convert.hf_mapping import load_full_state
from megatron_longvila.convert.hf_source import (
    HFSource,
    read_longvila_config,
    read_longvila_weights,
)
from megatron_longvila.core import platform
from megatron_longvila.models.config import MODULES, LongVILAConfig
from megatron_longvila.models.longvila import LongVILAModel
from megatron_longvila.models.longvila_step import build_longvila_model


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
    return (path / "config.json").is_file() and all((path / p).is_dir() for p in MODULES)


def resolve_checkpoint(path: str | Path, token_order: str | None = None) -> CheckpointSource:
    """Find the checkpoint under ``path`` and what it records (no process group needed).

    ``token_order`` (Hugging Face folders only) overrides what the folder says.
    """
    path = Path(path)
    if path.exists() and is_hf_folder(path):
        return _hf_source(path, token_order)
    try:
        directory = resolve_checkpoint_dir(path)
    except CheckpointError as exc:
        if not path.exists():
            raise
        raise CheckpointError(
            f"{exc}, nor a Hugging Face folder ({', '.join(f'{p}/' for p in MODULES)}, config.json)"
        ) from None
    state = read_train_state(directory)
    config = state.get(MODEL_CONFIG_KEY)
    config = None if config is None else LongVILAConfig.from_dict(config)
    if token_order is not None and (config is None or config.projector.token_order != token_order):
        raise CheckpointError(
            f"a token order ({token_order!r}) is for Hugging Face folders: {directory} is a "
            "Megatron checkpoint, whose recorded architecture holds its own"
        )
    return CheckpointSource(
        kind="megatron",
        directory=directory,
        config=config,
        tokenizer_path=tokenizer_from_train_state(state),
        chat_template=chat_template_from_train_state(state),
    )


def _hf_source(folder: Path, token_order: str | None) -> CheckpointSource:
    """A Hugging Face LongVILA folder, its architecture read by the checkpoint converter."""
    try:
        settings = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        config = read_longvila_config(HFSource.from_folder(folder, token_order=token_order))
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
    token_order: str | None = None,
    params_dtype: torch.dtype = torch.float32,
) -> tuple[LongVILAModel, CheckpointSource]:
    """This rank's whole LongVILA model with the weights of the checkpoint at ``path``, in eval
    mode, for the megatron-core layout already initialized (``initialize_mmsp``: any tp and
    ulysses × ring, pipeline size 1).

    ``model_config`` overrides the architecture the checkpoint records (and is required when it
    records none); ``token_order`` as in :func:`resolve_checkpoint`. Returns the model and what
    ``path`` resolved to (its ``config`` is the one used).
    """
    if parallel_state.get_pipeline_model_parallel_world_size() != 1:
        raise ValueError(
            f"inference runs with pipeline-parallel size 1, got "
            f"{parallel_state.get_pipeline_model_parallel_world_size()}; use tp and sp instead"
        )
    source = resolve_checkpoint(path, token_order)
    if model_config is not None:
        source.config = model_config
    if source.config is None:
        raise CheckpointError(
            f"{source.directory} does not record the model architecture ({TRAIN_STATE} has no "
            f"{MODEL_CONFIG_KEY!r}); pass model_config (CLI: --model-preset)"
        )
    (model,) = build_longvila_model(
        source.config,
        params_dtype=params_dtype,
        # Every weight is loaded below; decoding runs one token, which cannot be split over tp.
        transformer_overrides={
            **platform.weight_init_options(weights_loaded=True),
            "sequence_parallel": False,
        },
    )
    if source.kind == "hf":
        if parallel_state.get_tensor_model_parallel_world_size() != 1:
            raise CheckpointError(
                f"{source.directory}: Hugging Face folders load with tensor-parallel size 1; "
                "convert to a Megatron checkpoint for other layouts"
            )
        hf = HFSource.from_folder(source.directory, token_order=token_order)
        load_full_state(model, read_longvila_weights(hf, read_longvila_config(hf)))
    else:
        load_model_weights(model, source.directory)
    model.eval()
    return model, source
