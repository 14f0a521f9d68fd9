"""Our own LongVILA model as clip captioner ("longvila:CHECKPOINT").

Each process that captions (a builder worker, or the calling process with ``workers=0``) is a
world of its own: one rank, tp = sp = 1. The captioner joins or starts that world, loads the
checkpoint once (:func:`~megatron_longvila.inference.load_model_for_inference`: a trainer's save
root, one ``iter_*`` folder, a dist checkpoint or a Hugging Face LongVILA folder) with the
tokenizer and chat template the checkpoint records, and answers every clip with one greedy
:meth:`~megatron_longvila.inference.Generator.generate`: the clip's frames are the video, the
caption prompt the question. Frames are scaled and normalized for the vision tower as the
training pipeline does (``pad``, SigLIP mean/std: :class:`~megatron_longvila.inference.
FrameSettings`' defaults).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_longvila.checkpoint.layout import CheckpointError
from megatron_longvila.core import cpu_adaptations, platform
from megatron_longvila.core.parallel_state import (
    MMSPTopology,
    get_mmsp_topology,
    initialize_mmsp,
    mmsp_is_initialized,
)
from megatron_longvila.data.chat_template import all_template_markers
from megatron_longvila.data.tokenizer import load_tokenizer
from megatron_longvila.data.vision_transform import scale_frames, to_tower_input
from megatron_longvila.inference import FrameSettings, Generator, load_model_for_inference
from megatron_longvila.inference.loading import resolve_checkpoint


def join_single_rank_world() -> None:
    """Make this process a one-rank megatron-core layout (tp = sp = pp = 1).

    Starts a one-rank process group when there is none (an in-memory store: no port to pick,
    nothing to collide with other workers) and initializes MM-SP on it; a process group or a
    layout that is already there is reused when it is one rank / tp = sp = pp = 1.
    """
    platform.init_single_process()
    if mmsp_is_initialized():
        topology = get_mmsp_topology()
        if topology.model_parallel_size != 1:
            raise ValueError(
                f"a LongVILA captioner runs its model on one rank, but this process is already "
                f"part of the layout {topology} (tp × sp × pp = {topology.model_parallel_size})"
            )
        return
    if dist.get_world_size() != 1:
        raise ValueError(
            f"a LongVILA captioner runs its model on one rank, but this process belongs to a "
            f"process group of {dist.get_world_size()} ranks without a model-parallel layout; "
            "build it in a process without one (builder workers are) or after "
            "initialize_mmsp(MMSPTopology()) on every rank"
        )
    initialize_mmsp(MMSPTopology())


class LongVILACaptioner:
    """A LongVILA checkpoint as captioner; see the module docstring.

    ``device`` must be where this process computes (``platform.local_device()``: its GPU, or the
    CPU); ``dtype`` is the parameter dtype name (None: float32).
    """

    def __init__(self, checkpoint: str, device: str = "cpu", dtype: str | None = None) -> None:
        wanted = torch.device(device)
        local = platform.local_device()
        if wanted.type != local.type:
            raise ValueError(
                f"captioner 'longvila:{checkpoint}': device={device!r}, but the model is built "
                f"on this process's device ({local.type})"
            )
        if wanted.index is not None and wanted.type == "cuda":
            torch.cuda.set_device(wanted)
        source = resolve_checkpoint(checkpoint)  # bad paths fail before any process group
        if source.tokenizer_path is None:
            raise CheckpointError(
                f"{source.directory} records no tokenizer (train_state.json has neither "
                "tokenizer_path nor config.data.tokenizer_path)"
            )
        tokenizer = load_tokenizer(source.tokenizer_path, all_template_markers())
        cpu_adaptations.adapt_megatron_for_cpu()
        join_single_rank_world()
        model, _ = load_model_for_inference(
            checkpoint, params_dtype=platform.dtype_from_name(dtype) or torch.float32
        )
        self.frames = FrameSettings()
        self.generator = Generator(
            model, tokenizer, chat_template=source.chat_template or "qwen2", frames=self.frames
        )

    def tower_input(self, frames: list[torch.Tensor]) -> torch.Tensor:
        """uint8 frames [3, H, W] -> the vision tower's float input [n, 3, S, S] (S: the
        tower's image size), scaled and normalized as in training."""
        vision, mode = self.generator.model.cfg.vision, self.frames.resize_mode
        scaled = scale_frames(frames, vision.image_size, mode)
        return to_tower_input(scaled, vision.image_size, mode, vision.image_mean, vision.image_std)

    def caption(self, frames: list[torch.Tensor], prompt: str, max_new_tokens: int) -> str:
        # Greedy (the default temperature 0); prefill moves the frames to the model's device.
        answer = self.generator.generate(
            prompt, self.tower_input(frames), max_new_tokens=max_new_tokens
        )
        return answer.text.strip()
