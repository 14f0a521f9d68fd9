"""Hugging Face weights → a megatron dist checkpoint in a TP/PP layout, or straight into a model.

:func:`hf_to_megatron`:

1. one process reads the source (:mod:`.hf_source`), converts it to full tensors by module name
   (TP=1) and stages them in one safetensors file inside the output folder, with the
   architecture;
2. every rank of a ``tp × pp`` (× dp) world builds the model in that layout (no random init),
   reads just its slices of the staged tensors (:func:`.full_tensors.load_full_tensors_into`,
   driven by the model's own ``sharded_state_dict``) and the trainer's
   :class:`CheckpointManager` saves it as step 0, with a train state recording the
   architecture, the tokenizer and the source;
3. the staging file is removed.

Under torchrun (a process group exists) the calling processes are the ranks, rank 0 staging;
otherwise a pool of ``tp × pp`` gloo processes on the CPU is spawned. sp and dp replicas hold the
same tensors and torch_dist checkpoints are resharded on load, so the result also serves any
sp/dp (and any other tp/pp) when the trainer loads it as ``init.checkpoint``.

:func:`load_hf_into_model` does step 2 in memory, for a model that the trainer or the inference
code has already built.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from megatron_longvila.checkpoint.train_state import MODEL_CONFIG_KEY, model_record
from megatron_longvila.convert.full_tensors import (
    TensorsInMemory,
    TensorsInSafetensorsFile,
    load_full_tensors_into,
)
from megatron_longvila.convert.hf_mapping import ConversionError, llm_config_extras
from megatron_longvila.convert.hf_source import (
    TOP_CONFIG,
    HFSource,
    read_json,
    read_longvila_config,
    read_longvila_weights,
)
from megatron_longvila.convert.outputs import check_output, prepare_output
from megatron_longvila.convert.safetensors_io import save_tensors_file
from megatron_longvila.data.tokenizer import has_vocabulary
from megatron_longvila.models.config import LongVILAConfig

STAGING_DIR = ".staging"
_WEIGHTS, _META = "weights.safetensors", "conversion.json"


def _train_state(source: HFSource, cfg: LongVILAConfig, seed: int) -> dict[str, Any]:
    """What the converted checkpoint records (:mod:`megatron_longvila.checkpoint.train_state`)."""
    projector = str(source.mm_projector) if source.mm_projector else f"fresh (seed {seed})"
    record = model_record(
        cfg,
        tokenizer_path=source.llm.resolve() if has_vocabulary(source.llm) else None,
        num_frames=source.settings.get("num_video_frames"),
        fps=source.settings.get("fps"),
        hf_llm_config=llm_config_extras(read_json(source.llm / TOP_CONFIG)),
    )
    converted_from = {
        "llm": str(source.llm),
        "vision_tower": str(source.vision_tower),
        "mm_projector": projector,
    }
    return {**record, "converted_from": converted_from}


def stage_hf_weights(
    source: HFSource,
    output: str | Path,
    *,
    dtype: torch.dtype | None = None,
    seed: int = 1234,
    force: bool = False,
) -> Path:
    """Step 1 (see the module docstring); returns the staging folder inside ``output``."""
    inputs = [p for p in (source.llm, source.vision_tower, source.mm_projector) if p is not None]
    check_output(output, force, inputs)
    cfg = read_longvila_config(source)
    state = read_longvila_weights(source, cfg, seed)  # errors name the tensor before any write
    if dtype is not None:
        state = {name: t.to(dtype) for name, t in state.items()}
    params_dtype = dtype or state["llm.embedding.word_embeddings.weight"].dtype
    staging = prepare_output(output, force, inputs) / STAGING_DIR
    staging.mkdir()
    save_tensors_file(staging / _WEIGHTS, state)
    meta = {
        "params_dtype": str(params_dtype).removeprefix("torch."),
        "train_state": _train_state(source, cfg, seed),
    }
    (staging / _META).write_text(json.dumps(meta, indent=2), encoding="utf-8")
    return staging


def write_checkpoint_from_staging(
    staging: str | Path, output: str | Path, tp: int, pp: int, progress: bool = False
) -> str:
    """Step 2 on this rank (see the module docstring); returns the checkpoint folder."""
    from megatron.core import parallel_state

    from megatron_longvila.checkpoint.manager import CheckpointManager
    from megatron_longvila.core.parallel_state import MMSPTopology, initialize_mmsp
    from megatron_longvila.models.longvila_step import build_longvila_model

    staging = Path(staging)
    meta = json.loads((staging / _META).read_text(encoding="utf-8"))
    cfg = LongVILAConfig.from_dict(meta["train_state"][MODEL_CONFIG_KEY])
    if parallel_state.model_parallel_is_initialized():
        raise ConversionError(
            "megatron's parallel state is already initialized; convert in a process of its own"
        )
    initialize_mmsp(MMSPTopology(tp=tp, pp=pp))
    try:
        (model,) = build_longvila_model(
            cfg,
            params_dtype=getattr(torch, meta["params_dtype"]),
            transformer_overrides={"perform_initialization": False},  # every weight is loaded
        )
        source = TensorsInSafetensorsFile(staging / _WEIGHTS)
        load_full_tensors_into(model, source, progress=progress and dist.get_rank() == 0)
        manager = CheckpointManager(output)
        directory = manager.save(0, {"model": model.sharded_state_dict()}, meta["train_state"])
    finally:
        parallel_state.destroy_model_parallel()
    return str(directory)


def _spawned(staging: Path, output: Path, tp: int, pp: int, progress: bool) -> str:
    from megatron_longvila.core.rank_pool import RankPool

    # CPU processes joined by gloo, whatever accelerators the machine has.
    with RankPool(tp * pp, env={"CUDA_VISIBLE_DEVICES": ""}) as pool:
        return pool.run(write_checkpoint_from_staging, staging, output, tp, pp, progress)[0]


def _on_existing_ranks(
    source: HFSource, output: Path, tp: int, pp: int, progress: bool, **stage: Any
) -> str:
    """Steps 1–3 on the ranks of the current process group (rank 0 stages)."""
    staging, error = output.resolve() / STAGING_DIR, None
    if dist.get_rank() == 0:
        try:
            staging = stage_hf_weights(source, output, **stage)
        except (ConversionError, OSError, ValueError) as exc:
            error = f"{type(exc).__name__}: {exc}"
    box = [error]
    dist.broadcast_object_list(box, src=0)
    if box[0] is not None:
        raise ConversionError(f"rank 0 could not stage the weights: {box[0]}")
    try:
        return write_checkpoint_from_staging(staging, output, tp, pp, progress)
    finally:
        if dist.get_rank() == 0:
            shutil.rmtree(staging, ignore_errors=True)


def hf_to_megatron(
    source: HFSource,
    output: str | Path,
    *,
    tp: int = 1,
    pp: int = 1,
    dtype: torch.dtype | None = None,
    seed: int = 1234,
    force: bool = False,
    progress: bool = False,
) -> Path:
    """Convert ``source`` into a checkpoint root ``output`` (see the module docstring).

    ``dtype`` casts the weights (default: the LLM's dtype as stored); ``seed`` initializes the
    projector when the source has none. Returns the checkpoint folder (``output/iter_0000000``).
    """
    output = Path(output)
    stage = {"dtype": dtype, "seed": seed, "force": force}
    if dist.is_initialized():
        return Path(_on_existing_ranks(source, output, tp, pp, progress, **stage))
    staging = stage_hf_weights(source, output, **stage)
    try:
        return Path(_spawned(staging, output.resolve(), tp, pp, progress))
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def load_hf_into_model(
    model: torch.nn.Module,
    source: HFSource | str | Path,
    *,
    seed: int = 1234,
    progress: bool = False,
) -> None:
    """Set this rank's LongVILA model chunk (any layout, megatron-DDP-wrapped or not) to the
    weights of ``source`` (a LongVILA folder or an :class:`HFSource`), converted for the model's
    own architecture. Each calling process reads the whole source. Call it before the optimizer
    is built, or call the optimizer's ``reload_model_params()`` after it: mixed-precision and
    distributed optimizers keep fp32 copies of the weights made when they are created."""
    from megatron.core.utils import get_attr_wrapped_model

    core = get_attr_wrapped_model(model, "prepare_inputs", return_model_obj=True)
    if not isinstance(source, HFSource):
        source = HFSource.from_folder(source)
    state = read_longvila_weights(source, core.cfg, seed)
    load_full_tensors_into(core, TensorsInMemory(state), progress)
