"""KV-cached generation with the LongVILA model over an MM-SP group.

**Prefill** (:func:`prefill`). The prompt — text with one placeholder per video/image — goes
through the model's own two-stage sharding: each sp rank encodes only its stage-1 share of the
frames (:attr:`MultimodalPrompt.local_frames`), the visual tokens are delivered to the ranks
whose zigzag shard holds their positions, and the LLM runs on this rank's shard with 2D
(Ulysses × ring) attention. Every layer's attention keeps the keys (after RoPE) and values of
this rank's real prompt tokens in its own :class:`ShardedKVCache`. Only the hidden state of the
last prompt token goes through the output layer (its rank shares it by an all-reduce), so the
``[tokens, vocab]`` logits of the prompt are never built.

**Decode** (:func:`decode_step`). The new token is embedded and run through the same megatron
layers on every rank of the group (one token, replicated; tensor parallel inside), with its
position id ``prompt_length + step`` for RoPE. In each layer the new key/value is stored by one
rank (the one caching the fewest tokens) and the query attends over every rank's cache:
partial ``(out, lse)`` per rank, merged by log-sum-exp. The cache is never gathered.

**Why the core-attention route.** The cache lives entirely in the ``core_attention`` module
(:class:`~megatron_longvila.core.sequence_parallel.attention.MMSPAttention`), driven by an
:class:`~megatron_longvila.core.sequence_parallel.decode.MMSPKVCacheParams` passed as megatron's
``packed_seq_params``. Everything else is the model's own forward over its own weights —
embedding, QKV projection, RoPE from explicit position ids, output projection, MLP, final norm,
output layer — so there is no second implementation of the LLM to keep in step with training
and with checkpoints, and tensor parallelism works as in training.

Scope: one prompt at a time (batch 1: every row of a batch would need the same prompt length);
pipeline size 1 (every rank holds all layers; sp and tp split the work). Everything runs under
``torch.no_grad``.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from dataclasses import dataclass
from typing import Literal

import torch

from megatron_longvila.core.sequence_parallel.decode import MMSPKVCacheParams
from megatron_longvila.core.sequence_parallel.sharding import token_at
from megatron_longvila.core.sequence_parallel.visual_exchange import frame_range
from megatron_longvila.data.batch import IGNORE_INDEX, MultimodalBatch
from megatron_longvila.inference.sampling import SamplingParams, agree_on_token, choose_next_token
from megatron_longvila.models.longvila import LongVILAModel
from megatron_longvila.models.multimodal_inputs import (
    MMSPInputs,
    prepare_mmsp_inputs,
    select_frames,
)


@dataclass
class MultimodalPrompt:
    """One prompt as one sp rank sees it.

    input_ids: [s] token ids with one ``<image>``/``<video>`` placeholder per media item.
    frames_per_item: frames of each media item, in text order.
    local_frames: [n, C, H, W] the frames this rank encodes (its stage-1 share of all frames in
        order, :func:`~megatron_longvila.core.sequence_parallel.visual_exchange.frame_range`);
        None when it encodes none.
    """

    input_ids: torch.Tensor
    frames_per_item: tuple[int, ...]
    local_frames: torch.Tensor | None

    @classmethod
    def from_media(
        cls, input_ids: torch.Tensor, media: list[torch.Tensor], sp: int = 1, sp_rank: int = 0
    ) -> MultimodalPrompt:
        """From every media item's frames ([frames, C, H, W] each): keeps only this rank's share."""
        frames = tuple(int(m.shape[0]) for m in media)
        local = select_frames(media, *frame_range(sum(frames), sp, sp_rank)) if media else None
        return cls(input_ids=input_ids, frames_per_item=frames, local_frames=local)

    @property
    def num_frames(self) -> int:
        return sum(self.frames_per_item)

    def expanded_length(self, tokens_per_frame: int) -> int:
        """Tokens of the prompt once every placeholder became its frames' visual tokens."""
        text = int(self.input_ids.numel()) - len(self.frames_per_item)
        return text + self.num_frames * tokens_per_frame


@dataclass
class DecodingState:
    """The KV cache of one sequence on this rank, and the position id of the next token."""

    kv: MMSPKVCacheParams
    next_position: int


@dataclass
class Generation:
    """The result of :func:`generate_tokens`, the same on every rank except the cache size.

    token_ids: the new tokens (a stop token that ended generation included).
    finish_reason: "stop" (a stop token) or "length" (``max_new_tokens`` reached).
    prompt_length: tokens of the expanded prompt.
    prefill_seconds: prompt in → logits of the first new token out (vision tower included).
    decode_seconds: the remaining tokens.
    kv_cache_bytes: keys and values this rank holds at the end, all layers.
    step_logits: [len(token_ids), vocab] fp32 logits each token was chosen from (on request).
    """

    token_ids: list[int]
    finish_reason: Literal["stop", "length"]
    prompt_length: int
    prefill_seconds: float
    decode_seconds: float
    kv_cache_bytes: int
    step_logits: torch.Tensor | None = None

    @property
    def decode_tokens_per_second(self) -> float:
        """Tokens per second after the first (each one a full pass through the model)."""
        steps = len(self.token_ids) - 1
        return steps / self.decode_seconds if steps and self.decode_seconds > 0 else 0.0


def _device(model: LongVILAModel) -> torch.device:
    return next(model.parameters()).device


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _check_whole_model(model: LongVILAModel) -> None:
    if not (model.pre_process and model.post_process):
        raise ValueError(
            "inference runs the whole model on every rank (pipeline-parallel size 1); this "
            "model is one stage of a pipeline"
        )


def prompt_inputs(model: LongVILAModel, prompt: MultimodalPrompt) -> MMSPInputs:
    """This rank's :class:`MMSPInputs` for ``prompt`` (zigzag shard of the expanded prompt, the
    route of the visual tokens, this rank's frames). The other ranks' frames are not needed:
    the layout is computed from the frame counts alone."""
    cfg, groups = model.cfg, model.groups
    v = cfg.vision
    frame_shape = (v.num_channels, v.image_size, v.image_size)
    start, stop = frame_range(prompt.num_frames, groups.sp_size, groups.sp_rank)
    local = prompt.local_frames
    found = (0, *frame_shape) if local is None else tuple(local.shape)
    if found != (stop - start, *frame_shape):
        raise ValueError(
            f"sp rank {groups.sp_rank} encodes frames {start}..{stop - 1} of {prompt.num_frames}, "
            f"so its local_frames must be [{stop - start}, {', '.join(map(str, frame_shape))}]; "
            f"got {found}"
        )
    ids = prompt.input_ids.reshape(1, -1).cpu()
    batch = MultimodalBatch(
        input_ids=ids,
        labels=torch.full_like(ids, IGNORE_INDEX),
        segment_ids=torch.zeros_like(ids),
        # Shapes only: the layout needs the frame counts, not the pixels.
        media=[torch.empty(n, *frame_shape, device="meta") for n in prompt.frames_per_item],
        keys=[["prompt"]],
    )
    inputs = prepare_mmsp_inputs(
        batch, cfg, sp=groups.sp_size, sp_rank=groups.sp_rank, with_frames=False
    )
    if local is not None:
        local = local.to(dtype=next(model.parameters()).dtype)
    return dataclasses.replace(inputs, frames=local).to(_device(model))


@torch.no_grad()
def prefill(
    model: LongVILAModel, prompt: MultimodalPrompt, max_new_tokens: int
) -> tuple[torch.Tensor, DecodingState]:
    """Run the prompt and cache its keys/values (room for ``max_new_tokens`` more).

    Returns the logits [vocab] fp32 of the token after the prompt (the same on every rank) and
    the state for :func:`decode_step`.
    """
    _check_whole_model(model)
    prompt_length = prompt.expanded_length(model.cfg.tokens_per_frame)
    limit = model.cfg.seq_length_limit
    if prompt_length + max_new_tokens > limit:
        raise ValueError(
            f"the prompt is {prompt_length} tokens ({prompt.num_frames} frames × "
            f"{model.cfg.tokens_per_frame} tokens + text); with {max_new_tokens} new tokens it "
            f"exceeds the model's maximum sequence length {limit}"
        )
    inputs = prompt_inputs(model, prompt)
    # The last new token is chosen but never run, so it is never cached.
    kv = MMSPKVCacheParams(
        prompt_length=prompt_length, max_tokens=prompt_length + max_new_tokens - 1
    )
    hidden = model.llm.hidden_states(
        None, inputs.position_ids, decoder_input=model.embed(inputs), packed_seq_params=kv
    )  # [S/sp, 1, hidden]
    last = token_at(hidden, prompt_length - 1, model.groups.sp, dim=0)  # [1, hidden]
    logits = model.llm.logits(last.unsqueeze(0))  # [1, 1, vocab]
    return logits[0, 0].float(), DecodingState(kv=kv, next_position=prompt_length)


@torch.no_grad()
def decode_step(model: LongVILAModel, token: int, state: DecodingState) -> torch.Tensor:
    """Run ``token`` (the same on every rank) after the cached sequence; cache it and return the
    logits [vocab] fp32 of the token after it."""
    device = _device(model)
    ids = torch.tensor([[token]], dtype=torch.long, device=device)
    position = torch.tensor([[state.next_position]], dtype=torch.long, device=device)
    hidden = model.llm.hidden_states(
        None, position, decoder_input=model.llm.embed(ids), packed_seq_params=state.kv
    )  # [1, 1, hidden]
    state.next_position += 1
    return model.llm.logits(hidden)[0, 0].float()


def generate_tokens(
    model: LongVILAModel,
    prompt: MultimodalPrompt,
    params: SamplingParams,
    return_logits: bool = False,
) -> Generation:
    """Generate after ``prompt`` under ``params``; every rank of the sp group returns the same
    tokens (and must call this with the same prompt layout and params)."""
    device = _device(model)
    generator = params.new_generator()
    _synchronize(device)
    start = time.perf_counter()
    logits, state = prefill(model, prompt, params.max_new_tokens)
    _synchronize(device)
    prefilled = time.perf_counter()
    tokens: list[int] = []
    step_logits = []
    finish: Literal["stop", "length"] = "length"
    while True:
        if return_logits:
            step_logits.append(logits.cpu())
        token = choose_next_token(logits, params, generator)
        tokens.append(agree_on_token(token, model.groups.sp, device))
        if tokens[-1] in params.stop_token_ids:
            finish = "stop"
            break
        if len(tokens) == params.max_new_tokens:
            break
        logits = decode_step(model, tokens[-1], state)
    _synchronize(device)
    return Generation(
        token_ids=tokens,
        finish_reason=finish,
        prompt_length=state.kv.prompt_length,
        prefill_seconds=prefilled - start,
        decode_seconds=time.perf_counter() - prefilled,
        kv_cache_bytes=state.kv.memory_bytes(),
        step_logits=torch.stack(step_logits) if return_logits else None,
    )


def score_continuations(
    model: LongVILAModel, prompt: MultimodalPrompt, continuations: list[list[int]]
) -> list[torch.Tensor]:
    """Log-probability of every token of each continuation after ``prompt``: one [len] fp32
    tensor per continuation (sum it for the continuation's log-likelihood).

    The prompt is prefilled once; each continuation is run token by token on the cache, which
    is then rewound to the prompt for the next.
    """
    if not continuations or any(len(c) == 0 for c in continuations):
        raise ValueError("every continuation needs at least one token")
    first_logits, state = prefill(model, prompt, max(len(c) for c in continuations))
    prompt_tokens, prompt_end = state.kv.tokens_per_rank(), state.next_position
    scores = []
    for continuation in continuations:
        logprobs = [torch.log_softmax(first_logits, -1)[continuation[0]]]
        for previous, token in itertools.pairwise(continuation):
            logits = decode_step(model, previous, state)
            logprobs.append(torch.log_softmax(logits, -1)[token])
        state.kv.rewind(prompt_tokens)
        state.next_position = prompt_end
        scores.append(torch.stack(logprobs).cpu())
    return scores
