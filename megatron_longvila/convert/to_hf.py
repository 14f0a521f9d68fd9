"""Megatron dist checkpoint (any TP/PP/SP layout) → LongVILA Hugging Face folder.

Runs in one process without a process group: the checkpoint's tensors are read whole
(:mod:`.megatron_source`), converted by ``hf_mapping`` and written by :mod:`.hf_export`.
"""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import torch

from megatron_longvila.checkpoint.layout import resolve_checkpoint_dir
from megatron_longvila.checkpoint.tensors import read_model_tensors
from megatron_longvila.checkpoint.train_state import (
    HF_LLM_CONFIG_KEY,
    architecture_from_train_state,
    frames_from_train_state,
    read_train_state,
    tokenizer_from_train_state,
)
from megatron_longvila.convert.hf_export import check_tokenizer, write_longvila_folder
from megatron_longvila.convert.hf_mapping import ConversionError
from megatron_longvila.convert.outputs import check_output, staged_output
from megatron_longvila.convert.parts import hf_parts_from_state
from megatron_longvila.convert.safetensors_io import DEFAULT_MAX_SHARD_BYTES
from megatron_longvila.data.config import DataConfig
from megatron_longvila.models.config import LongVILAConfig

_DEFAULT_FRAMES = next(f.default for f in fields(DataConfig) if f.name == "num_frames")


def megatron_to_hf(
    checkpoint: str | Path,
    output: str | Path,
    *,
    config: LongVILAConfig | None = None,
    tokenizer: str | Path | None = None,
    skip_tokenizer: bool = False,
    num_frames: int | None = None,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    force: bool = False,
    progress: bool = False,
) -> Path:
    """Export ``checkpoint`` (a root or an iteration folder) to the HF folder ``output``.

    ``config`` / ``tokenizer`` / ``num_frames`` default to what the checkpoint's train state
    records (frames: the data pipeline's default if nothing is recorded); ``dtype`` casts the
    weights (default: as saved). ``output`` must be empty or missing unless ``force``; the folder
    is written beside it and renamed into place, so a failed export leaves ``output`` as it was.
    Returns the checkpoint folder that was exported.
    """
    directory = resolve_checkpoint_dir(checkpoint)
    state = read_train_state(directory)
    cfg = config or architecture_from_train_state(state)
    if cfg is None:
        raise ConversionError(
            f"{directory}/train_state.json records no model architecture; give the config"
        )
    tokenizer = tokenizer or tokenizer_from_train_state(state)
    if tokenizer is None and not skip_tokenizer:
        raise ConversionError(
            f"{directory} records no tokenizer; give a tokenizer folder or skip the tokenizer"
        )
    if not skip_tokenizer:  # a wrong path stops the export before the output is touched
        check_tokenizer(Path(tokenizer))
    recorded_frames, fps = frames_from_train_state(state)
    check_output(output, force, inputs=[directory])

    tensors = read_model_tensors(directory)
    if dtype is not None:
        tensors = {name: t.to(dtype) for name, t in tensors.items()}
    hf_parts = hf_parts_from_state(tensors, cfg)  # shape errors before the output is touched
    with staged_output(output, force, inputs=[directory]) as staging:
        write_longvila_folder(
            staging,
            cfg,
            hf_parts,
            tokenizer=None if skip_tokenizer else Path(tokenizer),
            llm_extras=state.get(HF_LLM_CONFIG_KEY),
            num_frames=num_frames or recorded_frames or _DEFAULT_FRAMES,
            fps=fps,
            max_shard_bytes=max_shard_bytes,
            progress=progress,
        )
    return directory
