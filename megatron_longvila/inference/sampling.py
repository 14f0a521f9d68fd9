"""Choosing the next token: greedy, or sampling with temperature and top-p (nucleus), seeded.

Every rank of an sp group must append the same token. The logits are the same on every rank by
construction (replicated compute, partial attention results merged in rank order), and every
rank draws from an identically seeded generator; :func:`agree_on_token` then broadcasts sp rank
0's choice anyway, so the guarantee does not rest on bitwise-equal floating point. Sampling runs
on the CPU in fp32 from a CPU generator, so a seed gives the same draws on any device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class SamplingParams:
    """How tokens are chosen and when generation ends.

    temperature: 0 = greedy (argmax, lowest id on ties); > 0 divides the logits before softmax.
    top_p: sample only from the smallest set of most likely tokens whose probability reaches
        ``top_p`` (1 = the whole vocabulary). Ignored when greedy.
    seed: seeds the sampler (the same on every rank).
    stop_token_ids: generation ends after emitting one of these (it is kept in the output).
    max_new_tokens: generation ends after this many tokens.
    banned_token_ids: never chosen (e.g. the ``<image>``/``<video>`` placeholders, which only
        stand for media in a prompt and have no meaning as generated text).
    """

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    stop_token_ids: tuple[int, ...] = ()
    banned_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        for name in ("stop_token_ids", "banned_token_ids"):
            object.__setattr__(self, name, tuple(int(t) for t in getattr(self, name)))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def new_generator(self) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed)


def nucleus_probabilities(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """logits [vocab] → probabilities [vocab] fp32 of ``softmax(logits / temperature)`` kept on
    the smallest set of most likely tokens whose mass reaches ``top_p``, renormalized."""
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p >= 1:
        return probs
    sorted_probs, order = probs.sort(descending=True)
    mass_before = sorted_probs.cumsum(0) - sorted_probs
    keep_sorted = mass_before < top_p  # the first token is always kept
    kept = torch.zeros_like(probs).scatter(0, order, sorted_probs * keep_sorted)
    return kept / kept.sum()


def choose_next_token(
    logits: torch.Tensor, params: SamplingParams, generator: torch.Generator
) -> int:
    """The next token for ``logits`` [vocab] (any device) under ``params``."""
    if logits.dim() != 1:
        raise ValueError(f"logits must be [vocab], got shape {tuple(logits.shape)}")
    logits = logits.detach().float().cpu()
    if params.banned_token_ids:
        logits = logits.index_fill(0, torch.tensor(params.banned_token_ids), float("-inf"))
    if params.greedy:
        return int(logits.argmax())
    probs = nucleus_probabilities(logits, params.temperature, params.top_p)
    return int(torch.multinomial(probs, 1, generator=generator))


def agree_on_token(token: int, group: dist.ProcessGroup | None, device: torch.device) -> int:
    """sp rank 0's ``token`` on every rank of ``group`` (a no-op for a group of one)."""
    if group is None or dist.get_world_size(group) == 1:
        return token
    value = torch.tensor([token], dtype=torch.long, device=device)
    dist.broadcast(value, src=dist.get_global_rank(group, 0), group=group)
    return int(value)
