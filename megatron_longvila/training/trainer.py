"""The LongVILA trainer: one stage of the recipe, read top to bottom.

    config → topology → tokenizer + model → optimizer + schedule → data → checkpoint (resume or
    init) → loop (micro-batches through megatron's schedule, step, log, save) → final save.

Launch with torchrun (``python -m megatron_longvila.train stage.yaml key=value ...``) or
through ``megatron_longvila.training.launcher`` / ``examples/slurm``. The config is checked
completely before any process group starts.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.utils import get_attr_wrapped_model

from megatron_longvila.checkpoint.layout import CheckpointError, resolve_checkpoint_dir
from megatron_longvila.checkpoint.manager import CheckpointManager
from megatron_longvila.checkpoint.train_state import (
    HF_LLM_CONFIG_KEY,
    model_record,
    read_train_state,
)
from megatron_longvila.convert import HFSource, load_hf_into_model
from megatron_longvila.convert.hf_mapping import llm_config_extras
from megatron_longvila.convert.hf_source import LLM_DIR, TOP_CONFIG, read_json
from megatron_longvila.core import cpu_adaptations, platform
from megatron_longvila.core.parallel_state import initialize_mmsp
from megatron_longvila.data.batch import MultimodalBatch
from megatron_longvila.data.chat_template import get_template
from megatron_longvila.data.loader import TrainLoader, build_train_loader
from megatron_longvila.data.tokenizer import TextTokenizer, load_tokenizer
from megatron_longvila.models.config import LongVILAConfig
from megatron_longvila.models.longvila_step import build_longvila_model, forward_step
from megatron_longvila.training.config import InitConfig, TrainConfig, load_train_config
from megatron_longvila.training.config_io import ConfigError, to_dict
from megatron_longvila.training.run_logger import RunLogger

# ---- building blocks ----------------------------------------------------------------------------


def architecture_for(config: TrainConfig, tokenizer: TextTokenizer) -> LongVILAConfig:
    """The configured architecture with the tokenizer's placeholder ids."""
    arch = config.architecture()
    if tokenizer.vocab_size > arch.llm.vocab_size:
        raise ConfigError(
            f"model.llm.vocab_size = {arch.llm.vocab_size} is smaller than the tokenizer's "
            f"{tokenizer.vocab_size} tokens ({config.data.tokenizer_path})"
        )
    return replace(arch, image_token_id=tokenizer.image_id, video_token_id=tokenizer.video_id)


def precision_of(config: TrainConfig) -> torch.dtype:
    return platform.dtype_from_name(config.run.precision)


def build_model(
    config: TrainConfig, arch: LongVILAConfig, dtype: torch.dtype
) -> list[DistributedDataParallel]:
    """This rank's model chunk(s), frozen modules marked, wrapped in megatron's DDP."""
    # On GPUs, weights that init.checkpoint overwrites are only allocated, not drawn.
    overrides: dict[str, Any] = platform.weight_init_options(
        weights_loaded=bool(config.init.checkpoint)
    )
    if config.parallel.recompute:
        overrides.update(
            recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1
        )
    if dtype == torch.bfloat16:
        overrides.update(bf16=True)
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        use_distributed_optimizer=config.parallel.use_distributed_optimizer,
    )
    return build_longvila_model(
        arch,
        ddp_config=ddp_config,
        params_dtype=dtype,
        transformer_overrides=overrides,
        seed=config.run.seed,
        frozen=config.model.freeze,
    )


def build_optimizer(config: TrainConfig, model: list, dtype: torch.dtype):
    opt = config.optimizer
    optimizer = get_megatron_optimizer(
        OptimizerConfig(
            optimizer="adam",
            lr=opt.lr,
            min_lr=opt.min_lr,
            weight_decay=opt.weight_decay,
            adam_beta1=opt.adam_beta1,
            adam_beta2=opt.adam_beta2,
            adam_eps=opt.adam_eps,
            clip_grad=opt.clip_grad,
            bf16=dtype == torch.bfloat16,
            params_dtype=dtype,
            use_distributed_optimizer=config.parallel.use_distributed_optimizer,
        ),
        model,
    )
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if opt.warmup_steps else opt.lr,
        max_lr=opt.lr,
        min_lr=opt.min_lr,
        lr_warmup_steps=opt.warmup_steps,
        lr_decay_steps=config.run.train_steps,
        lr_decay_style="cosine",
        start_wd=opt.weight_decay,
        end_wd=opt.weight_decay,
        wd_incr_steps=config.run.train_steps,
        wd_incr_style="constant",
    )
    return optimizer, scheduler


def sharded_state(model: list, optimizer, loading: bool = False) -> dict[str, Any]:
    """Model (and optimizer) as dist_checkpointing sees them; ``loading`` makes the optimizer
    allocate the state it is about to receive."""
    model_sd = {f"chunk{i}": chunk.module.sharded_state_dict() for i, chunk in enumerate(model)}
    flat = model_sd if len(model) > 1 else model_sd["chunk0"]
    state = {"model": flat}
    if optimizer is not None:
        state["optimizer"] = optimizer.sharded_state_dict(flat, is_loading=loading)
    return state


def load_model_state(model: list, loaded: dict[str, Any]) -> None:
    if len(model) == 1:
        model[0].module.load_state_dict(loaded)
    else:
        for i, chunk in enumerate(model):
            chunk.module.load_state_dict(loaded[f"chunk{i}"])


def load_initial_weights(init: InitConfig, model: list, optimizer: Any) -> None:
    """Start a fresh run from ``init.checkpoint`` (the previous stage's model weights) or from
    ``init.hf`` (a LongVILA Hugging Face folder); the optimizer's fp32 main copies, made from the
    random init when it was built, are refreshed from the loaded weights."""
    if init.checkpoint:
        directory = resolve_checkpoint_dir(init.checkpoint)
        loaded = CheckpointManager(directory.parent).load(sharded_state(model, None), directory)
        load_model_state(model, loaded.sharded["model"])
    else:
        source = HFSource.from_folder(init.hf, token_order=init.token_order)
        for chunk in model:
            load_hf_into_model(chunk, source)
    optimizer.reload_model_params()


def inherited_llm_extras(init: InitConfig) -> dict[str, Any] | None:
    """What the Hugging Face LLM a run descends from said beyond the architecture (token ids,
    ``initializer_range``, ...): ``init.hf``'s, or what ``init.checkpoint`` recorded of it. Kept
    in the run's checkpoints so that an export writes it back."""
    if init.hf:
        return llm_config_extras(read_json(Path(init.hf) / LLM_DIR / TOP_CONFIG))
    if init.checkpoint:
        return read_train_state(resolve_checkpoint_dir(init.checkpoint)).get(HF_LLM_CONFIG_KEY)
    return None


# ---- RNG streams --------------------------------------------------------------------------------


def rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {"torch_cpu": torch.get_rng_state()}
    if platform.cuda_available():
        tensors["torch_cuda"] = torch.cuda.get_rng_state()
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    for name, state in get_cuda_rng_tracker().get_states().items():
        tensors[f"tracker/{name}"] = state
    np_state = np.random.get_state()
    meta = {
        "python": _jsonable(random.getstate()),
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
    }
    return tensors, meta


def restore_rng_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    torch.set_rng_state(tensors["torch_cpu"])
    if "torch_cuda" in tensors and platform.cuda_available():
        torch.cuda.set_rng_state(tensors["torch_cuda"])
    tracker = {k.split("/", 1)[1]: v for k, v in tensors.items() if k.startswith("tracker/")}
    if tracker:
        get_cuda_rng_tracker().set_states(tracker)
    random.setstate(_tupled(meta["python"]))
    kind, keys, pos, has_gauss, gauss = meta["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))


def _jsonable(value: Any) -> Any:
    return [_jsonable(v) for v in value] if isinstance(value, (tuple, list)) else value


def _tupled(value: Any) -> Any:
    return tuple(_tupled(v) for v in value) if isinstance(value, list) else value


# ---- the loop -----------------------------------------------------------------------------------


def _mean_loss(reduced: list[dict[str, torch.Tensor]]) -> float:
    """Mean token loss of a step, known on every rank (sum and count over pp and dp)."""
    total = torch.zeros(2, dtype=torch.float64, device=platform.local_device())
    if parallel_state.is_pipeline_last_stage():
        for item in reduced:
            total += item["lm loss"].double()
    dist.all_reduce(total, group=parallel_state.get_pipeline_model_parallel_group())
    dist.all_reduce(total, group=parallel_state.get_data_parallel_group())
    return float(total[0] / total[1].clamp(min=1)), int(total[1])


def _sequence_tokens(batch: MultimodalBatch, tokens_per_frame: int) -> int:
    """Tokens of the multimodal sequence(s) of a micro-batch, visual tokens included."""
    return batch.input_ids.numel() - len(batch.media) + batch.num_frames * tokens_per_frame


def _frames_encoded(model: list) -> int:
    """Frames this rank's vision tower encoded since the last call (its stage-1 share)."""
    return sum(get_attr_wrapped_model(chunk, "take_frames_encoded")() for chunk in model)


def _per_rank(value: int) -> list[int]:
    """``value`` of every rank, world ranks in order (a collective: every rank calls it)."""
    mine = torch.tensor([value], dtype=torch.long, device=platform.local_device())
    gathered = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, mine)
    return [int(v) for v in gathered]


def _memory_gb() -> float:
    if platform.cuda_available():
        return torch.cuda.max_memory_allocated() / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB


def train(config: TrainConfig) -> dict[str, Any]:
    """Run one stage on the current process group; returns a summary (rank 0's view)."""
    p = config.parallel
    initialize_mmsp(p.topology())
    rank0 = dist.get_rank() == 0

    tokenizer = load_tokenizer(
        config.data.tokenizer_path, get_template(config.data.chat_template).markers
    )
    arch = architecture_for(config, tokenizer)
    described = model_record(  # what inference and the converter need
        arch,
        tokenizer_path=Path(config.data.tokenizer_path).resolve(),
        chat_template=config.data.chat_template,
        num_frames=config.data.num_frames,
        hf_llm_config=inherited_llm_extras(config.init),
    )
    dtype = precision_of(config)
    model = build_model(config, arch, dtype)
    optimizer, scheduler = build_optimizer(config, model, dtype)
    loader: TrainLoader = build_train_loader(
        config.data,
        dp_rank=parallel_state.get_data_parallel_rank(),
        dp_size=parallel_state.get_data_parallel_world_size(),
        tokenizer=tokenizer,
    )

    checkpoints = CheckpointManager(config.checkpoint_dir, keep_last=config.run.keep_last)
    start_step = 0
    saved_rng = None
    if checkpoints.latest_dir() is not None:  # resume this stage
        loaded = checkpoints.load(sharded_state(model, optimizer, loading=True))
        load_model_state(model, loaded.sharded["model"])
        optimizer.load_state_dict(loaded.sharded["optimizer"])
        scheduler.load_state_dict(loaded.train_state["scheduler"])
        start_step = loaded.step
        if loaded.rank_tensors is not None:
            saved_rng = (loaded.rank_tensors, loaded.rank_meta)
            loader.load_state_dict(loaded.rank_meta["loader"])
        else:  # another world size: the data position of this dp replica is all we can keep
            raise CheckpointError(
                f"{loaded.directory} was written by {loaded.train_state['world_size']} ranks; "
                f"resuming with {dist.get_world_size()} needs the same world size for the exact "
                "data position (use it as init.checkpoint to start a new run from its weights)"
            )
    elif config.init.checkpoint or config.init.hf:
        load_initial_weights(config.init, model, optimizer)

    logger = RunLogger(
        config.run.output_dir,
        total_steps=config.run.train_steps,
        start_step=start_step,
        enabled=rank0,
        tensorboard=config.run.tensorboard,
        wandb_project=config.run.name if config.run.wandb else None,
        run_name=config.run.name,
        config=to_dict(config),
    )
    if rank0:
        (config.checkpoint_dir.parent / "config.json").write_text(
            json.dumps(to_dict(config), indent=2, default=str)
        )

    forward_backward = get_forward_backward_func()
    data = iter(loader)  # draws worker seeds from torch's RNG: restore the streams after it
    if saved_rng is not None:
        restore_rng_state(*saved_rng)
    seq_length = config.data.max_seq_length // p.sp
    last_loss = float("nan")
    for step in range(start_step + 1, config.run.train_steps + 1):
        started = time.perf_counter()
        batches = [next(data) for _ in range(config.run.micro_batches_per_step)]
        for chunk in model:
            chunk.zero_grad_buffer()
        optimizer.zero_grad()
        reduced = forward_backward(
            forward_step_func=forward_step,
            data_iterator=iter(batches),
            model=model,
            num_microbatches=len(batches),
            seq_length=seq_length,
            micro_batch_size=config.data.micro_batch_size,
            forward_only=False,
        )
        lr = scheduler.get_lr(optimizer.param_groups[0])  # the rate this step applies
        _, grad_norm, _ = optimizer.step()
        scheduler.step(increment=1)
        last_loss, loss_tokens = _mean_loss(reduced)
        frames = _frames_encoded(model)  # read every step: the count starts again at zero
        elapsed = time.perf_counter() - started

        if step % config.run.log_interval == 0 or step == config.run.train_steps:
            tokens = sum(_sequence_tokens(batch, arch.tokens_per_frame) for batch in batches)
            scalars = {
                "loss": last_loss,
                "lr": lr,
                "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
                "tokens_per_s": tokens * parallel_state.get_data_parallel_world_size() / elapsed,
                "loss_tokens": loss_tokens,
                "step_time_s": elapsed,
                "mem_gb": _memory_gb(),
            }
            keys = [key for batch in batches for row in batch.keys for key in row]
            media_frames = [int(m.shape[0]) for batch in batches for m in batch.media]
            frames_by_rank = _per_rank(frames)  # logging steps are the same on every rank
            logger.step(
                step,
                scalars,
                # media_frames: this replica's videos; frames_by_rank: every rank's share of its
                # replica's frames (equal shares across the sp group when stage 1 spreads them).
                {"samples": keys, "media_frames": media_frames, "frames_by_rank": frames_by_rank},
            )
        if step % config.run.save_interval == 0 or step == config.run.train_steps:
            tensors, meta = rng_state()
            meta["loader"] = loader.state_dict()
            checkpoints.save(
                step,
                sharded_state(model, optimizer),
                {"scheduler": scheduler.state_dict(), "config": to_dict(config), **described},
                tensors,
                meta,
            )
    logger.close()
    return {
        "steps": config.run.train_steps,
        "final_loss": last_loss,
        "issues": loader.issue_counts(),
    }


def parse_args(argv: list[str] | None) -> tuple[str, list[str]]:
    """``CONFIG [key=value ...]`` or ``--config CONFIG [key=value ...]``: (config, overrides)."""
    parser = argparse.ArgumentParser(prog="longvila-train", description="Train one LongVILA stage.")
    parser.add_argument(
        "words",
        nargs="*",
        metavar="[CONFIG] KEY=VALUE",
        help="the stage YAML (examples/configs/), then overrides, e.g. optimizer.lr=1e-4",
    )
    parser.add_argument("--config", help="the stage YAML, given as an option")
    args = parser.parse_args(argv)
    words = list(args.words)
    config = args.config
    if config is None:
        if not words or "=" in words[0]:
            parser.error("give the stage YAML: longvila-train CONFIG [key=value ...]")
        config = words.pop(0)
    not_overrides = [word for word in words if "=" not in word]
    if not_overrides:
        parser.error(f"after the config come key=value overrides, got {not_overrides}")
    return config, words


def main(argv: list[str] | None = None) -> int:
    config_path, overrides = parse_args(argv)
    try:
        config = load_train_config(config_path, overrides)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2

    cpu_adaptations.adapt_megatron_for_cpu()
    platform.init_distributed()
    if not platform.cuda_available():
        torch.set_num_threads(max(1, torch.get_num_threads() // max(1, dist.get_world_size())))
    try:
        summary = train(config)
        if dist.get_rank() == 0:
            print(json.dumps({"finished": config.run.name, **summary}))
    finally:
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()
    return 0
