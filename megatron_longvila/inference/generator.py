"""Questions about videos, answered by a loaded LongVILA model under MM-SP: the Python API.

:class:`Generator` wraps a model (from :func:`~.loading.load_model_for_inference`) with its
tokenizer and chat template and runs any number of prompts on it::

    generator = Generator(model, tokenizer, chat_template="qwen2")
    answer = generator.generate("What happens?", video="clip.mp4", num_frames=256)
    answer.text, answer.token_ids, answer.generation.prefill_seconds
    scores = generator.score_options("Which colour?", ["A", "B", "C", "D"], video="clip.mp4")

Every rank of the sp group makes the same calls. A video is given as a file path — each rank
then decodes only the frames it encodes (its stage-1 share, chosen by seeking), so no rank ever
holds every frame — or as a tensor of all frames ``[n, 3, H, W]`` already resized and normalized
for the vision tower. Frames are sampled, resized (``pad`` or ``crop``) and normalized exactly as
the training pipeline does. The user turn is ``<video>\\n{question}``, as in the training data.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_longvila.core.sequence_parallel.visual_exchange import frame_range
from megatron_longvila.data.chat_template import get_template, tokenize_prompt
from megatron_longvila.data.tokenizer import VIDEO_TOKEN, TextTokenizer
from megatron_longvila.data.video import (
    VideoDecodeError,
    decode_frames,
    frames_to_sample,
    probe_video,
    uniform_frame_indices,
)
from megatron_longvila.data.vision_transform import scaled_size, to_tower_input
from megatron_longvila.inference.decoding import (
    Generation,
    MultimodalPrompt,
    generate_tokens,
    score_continuations,
)
from megatron_longvila.inference.sampling import SamplingParams
from megatron_longvila.models.config import VisionConfig
from megatron_longvila.models.longvila import LongVILAModel

Video = str | Path | torch.Tensor


@dataclass
class Answer:
    """text: the decoded answer (a final stop token left out); token_ids: every new token;
    num_frames: frames of the video the model saw; generation: tokens, timings and cache size
    (see :class:`~.decoding.Generation`)."""

    text: str
    token_ids: list[int]
    num_frames: int
    generation: Generation


@dataclass(frozen=True)
class FrameSettings:
    """How frames are taken from a video file: ``num_frames`` spread uniformly (or ``fps``
    frames per second, at most ``max_frames``), resized by ``resize_mode`` and normalized."""

    num_frames: int = 8
    fps: float | None = None
    max_frames: int = 1024
    resize_mode: str = "pad"


def video_frame_share(
    path: str | Path, settings: FrameSettings, vision: VisionConfig, sp: int, sp_rank: int
) -> tuple[int, torch.Tensor | None]:
    """(frames sampled from the video in all, this rank's share [n, 3, S, S] fp32 or None, S the
    tower's image size, normalized with its mean/std): only the share is decoded."""
    image_size = vision.image_size
    data = Path(path).read_bytes()
    info = probe_video(data)
    wanted = frames_to_sample(info, settings.num_frames, settings.fps, settings.max_frames)
    indices = uniform_frame_indices(info.num_frames, wanted)
    start, stop = frame_range(len(indices), sp, sp_rank)
    if start == stop:
        return len(indices), None
    size = scaled_size(info.width, info.height, image_size, settings.resize_mode)
    frames = decode_frames(data, indices[start:stop], size)
    tensor = to_tower_input(
        frames, image_size, settings.resize_mode, vision.image_mean, vision.image_std
    )
    return len(indices), tensor


class Generator:
    """A loaded model with its prompt format; see the module docstring."""

    def __init__(
        self,
        model: LongVILAModel,
        tokenizer: TextTokenizer,
        *,
        chat_template: str = "qwen2",
        system_prompt: str | None = None,
        frames: FrameSettings | None = None,
    ) -> None:
        cfg = model.cfg
        if (tokenizer.image_id, tokenizer.video_id) != (cfg.image_token_id, cfg.video_token_id):
            raise ValueError(
                f"the tokenizer's <image>/<video> ids {tokenizer.image_id}/{tokenizer.video_id} "
                f"differ from the model's {cfg.image_token_id}/{cfg.video_token_id}"
            )
        if tokenizer.vocab_size > cfg.llm.vocab_size:
            raise ValueError(
                f"the tokenizer has {tokenizer.vocab_size} tokens, the model's vocabulary only "
                f"{cfg.llm.vocab_size}"
            )
        self.model = model
        self.tokenizer = tokenizer
        self.template = get_template(chat_template)
        self.system_prompt = system_prompt
        self.frames = frames or FrameSettings()
        self.end_of_turn_id = tokenizer.special_id(self.template.turn_end)

    def prompt(
        self, question: str, video: Video | None = None, frames: FrameSettings | None = None
    ) -> MultimodalPrompt:
        """This rank's view of the prompt: chat-templated ids ending with the assistant header,
        and its share of the video's frames."""
        text = question if video is None else f"{VIDEO_TOKEN}\n{question}"
        turns = [{"from": "human", "value": text}]
        ids = tokenize_prompt(turns, self.tokenizer, self.template, self.system_prompt)
        groups = self.model.groups
        if video is None:
            return MultimodalPrompt(ids, (), None)
        if isinstance(video, torch.Tensor):
            return MultimodalPrompt.from_media(ids, [video], groups.sp_size, groups.sp_rank)
        try:
            total, local = video_frame_share(
                video,
                frames or self.frames,
                self.model.cfg.vision,
                groups.sp_size,
                groups.sp_rank,
            )
            failure = None
        except (OSError, VideoDecodeError) as exc:
            failure = f"sp rank {groups.sp_rank}: {video}: {exc}"
        # Each rank decodes other frames: if one fails, all must stop (not wait in prefill).
        failures = [failure]
        if groups.sp_size > 1:
            failures = [None] * groups.sp_size
            dist.all_gather_object(failures, failure, group=groups.sp)
        if any(failures):
            raise VideoDecodeError("; ".join(f for f in failures if f))
        return MultimodalPrompt(ids, (total,), local)

    def generate(
        self,
        question: str,
        video: Video | None = None,
        *,
        frames: FrameSettings | None = None,
        max_new_tokens: int = 128,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int = 0,
        stop_token_ids: Sequence[int] | None = None,
    ) -> Answer:
        """Answer ``question`` about ``video``. Stops at the template's end-of-turn token unless
        ``stop_token_ids`` says otherwise; ``temperature=0`` is greedy. The ``<image>``/``<video>``
        placeholders are never generated."""
        params = SamplingParams(
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            seed=seed,
            stop_token_ids=(self.end_of_turn_id,) if stop_token_ids is None else stop_token_ids,
            banned_token_ids=(self.tokenizer.image_id, self.tokenizer.video_id),
        )
        prompt = self.prompt(question, video, frames)
        generation = generate_tokens(self.model, prompt, params)
        tokens = generation.token_ids
        shown = tokens[:-1] if generation.finish_reason == "stop" else tokens
        return Answer(self.tokenizer.decode(shown), tokens, prompt.num_frames, generation)

    def score_options(
        self,
        question: str,
        options: Sequence[str],
        video: Video | None = None,
        *,
        frames: FrameSettings | None = None,
    ) -> list[float]:
        """Log-likelihood of each option as the start of the answer (sum over its tokens), for
        multiple choice: the video is encoded and the prompt prefilled once for all options."""
        continuations = [self.tokenizer.encode(option) for option in options]
        empty = [option for option, ids in zip(options, continuations) if not ids]
        if empty:
            raise ValueError(f"options {empty} encode to no tokens")
        prompt = self.prompt(question, video, frames)
        scores = score_continuations(self.model, prompt, continuations)
        return [float(s.sum()) for s in scores]
