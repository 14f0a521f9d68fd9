"""Checkpoints written by the trainer, for evaluation.

The trainer saves ``{"model": ..., "optimizer": ...}`` and records its whole config (model
section, tokenizer, chat template) in ``train_state.json``, but no inference metadata. These two
functions read such a checkpoint: the architecture and data settings from the recorded config,
and the model part of the state alone (the optimizer's entries are left on disk).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from megatron_longvila.inference.loading import resolve_checkpoint
from megatron_longvila.models.config import LongVILAConfig
from megatron_longvila.models.longvila import LongVILAModel
from megatron_longvila.models.longvila_step import build_longvila_model
from megatron_longvila.training.checkpointing import TRAIN_STATE, CheckpointManager
from megatron_longvila.training.config import ModelSection


def recorded_training_setup(path: str | Path) -> tuple[LongVILAConfig | None, dict]:
    """(architecture, data section) from the trainer's config in the train state of the
    checkpoint at ``path``; (None, {}) when it records none."""
    source = resolve_checkpoint(path)
    state_file = source.directory / TRAIN_STATE
    if source.kind != "megatron" or not state_file.is_file():
        return None, {}
    config = json.loads(state_file.read_text(encoding="utf-8")).get("config")
    if not isinstance(config, dict) or "model" not in config:
        return None, {}
    return ModelSection(**config["model"]).build(), dict(config.get("data", {}))


def load_trained_model(
    path: str | Path, cfg: LongVILAConfig, params_dtype: torch.dtype = torch.float32
) -> LongVILAModel:
    """This rank's model (for the layout already initialized) with the weights of the trainer's
    checkpoint at ``path`` (a root or one ``iter_*`` folder), in eval mode."""
    directory = resolve_checkpoint(path).directory
    (model,) = build_longvila_model(cfg, params_dtype=params_dtype)
    loaded = CheckpointManager(directory.parent).load(
        {"model": model.sharded_state_dict()}, directory
    )
    model.load_state_dict(loaded.sharded["model"])
    return model.eval()
