"""Input sharding, loss and gradient reduction for a transformers model run with MM-SP.

Every rank of an sp group holds the same global batch; :meth:`MMSPSharding.shard_batch` turns it
into this rank's part (labels shifted *before* splitting, sequence padded to a multiple of
``2·sp`` for zigzag, global position ids so transformers' RoPE rotates each token by its true
position), :meth:`MMSPSharding.causal_lm_loss` gives the loss of the whole sequence, and
:meth:`MMSPSharding.sum_gradients` completes the gradients over the sp group.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from megatron_longvila.core.parallel_state import MMSPGroups
from megatron_longvila.core.sequence_parallel import comm_stats
from megatron_longvila.core.sequence_parallel.sharding import (
    pad_to_multiple,
    sequence_multiple,
    split_sequence,
    token_at,
)

IGNORE_INDEX = -100  # transformers' (and PyTorch's) "no loss here" label


@dataclass
class ShardedBatch:
    """This rank's shard of a causal-LM batch; ``S`` is the padded global length.

    input_ids, position_ids: [b, S/sp]; labels: [b, S/sp], already shifted (the label of a token
    is the next token of its sample, ``IGNORE_INDEX`` at sample ends and padding);
    segment_ids: [b, S/sp] sample index per token (-1 at padding), or None for one sample per row;
    num_valid_tokens: tokens with a label in the whole global batch.
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    labels: torch.Tensor
    segment_ids: torch.Tensor | None
    num_valid_tokens: int

    def model_inputs(self) -> dict[str, torch.Tensor | bool]:
        """Keyword arguments for the model's forward (labels excluded: see ``causal_lm_loss``;
        no KV cache, which a training step does not need)."""
        inputs = {
            "input_ids": self.input_ids,
            "position_ids": self.position_ids,
            "use_cache": False,
        }
        if self.segment_ids is not None:
            inputs["mmsp_segment_ids"] = self.segment_ids
        return inputs


def segment_ids_from_positions(position_ids: torch.Tensor) -> torch.Tensor | None:
    """[b, s] sample index per token, a new sample wherever positions do not go up by one
    (transformers' packed-sequence convention); None when every row is a single sample."""
    starts = torch.diff(position_ids, dim=-1) != 1  # [b, s-1]: token i+1 starts a sample
    if not starts.any():
        return None
    first = torch.zeros_like(position_ids[:, :1])
    return torch.cat([first, starts.long().cumsum(-1)], dim=1)


@dataclass(frozen=True)
class MMSPSharding:
    """How a transformers model's inputs are split over the sp group, and the matching loss."""

    groups: MMSPGroups
    layout: str = "zigzag"
    attn_implementation: str = "mmsp"

    @property
    def sp(self) -> int:
        return self.groups.sp_size

    @property
    def rank(self) -> int:
        return self.groups.sp_rank

    def split(self, x: torch.Tensor, dim: int = 1, pad_value: float = 0) -> torch.Tensor:
        """This rank's part of ``x`` (the full sequence along ``dim``, e.g. ``inputs_embeds
        [b, s, h]``), after padding ``dim`` with ``pad_value`` to the layout's multiple."""
        padded = pad_to_multiple(x, sequence_multiple(self.sp, self.layout), dim, pad_value)
        return split_sequence(padded, self.sp, self.rank, dim, self.layout)

    def value_at(self, x: torch.Tensor, position: int) -> torch.Tensor:
        """x: [b, S/sp, ...], this rank's shard; returns x at global ``position``, [b, ...], on
        every rank."""
        return token_at(x, position, self.groups.sp, dim=1, layout=self.layout)

    def shard_batch(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        pad_token_id: int = 0,
    ) -> ShardedBatch:
        """This rank's shard of a global batch.

        input_ids: [b, s]; labels: [b, s] in transformers' convention (unshifted, the token
        itself or ``IGNORE_INDEX``; default ``input_ids``); position_ids: [b, s] or None
        (``0..s-1``). Packed samples are given as position ids restarting at each sample (as
        transformers' ``DataCollatorWithFlattening`` makes them): tokens then attend only within
        their sample and a sample's last token gets no label.
        """
        b, s = input_ids.shape
        labels = input_ids if labels is None else labels
        if position_ids is None:
            position_ids = torch.arange(s, device=input_ids.device).expand(b, s)
        position_ids = position_ids.expand(b, s)
        if labels.shape != (b, s):
            raise ValueError(f"labels {tuple(labels.shape)} must match input_ids {(b, s)}")

        segment_ids = segment_ids_from_positions(position_ids)
        shifted = torch.cat([labels[:, 1:], labels.new_full((b, 1), IGNORE_INDEX)], dim=1)
        if segment_ids is not None:  # the next token belongs to another sample
            sample_end = torch.cat(
                [segment_ids[:, 1:] != segment_ids[:, :-1], segment_ids.new_ones(b, 1, dtype=bool)],
                dim=1,
            )
            shifted = shifted.masked_fill(sample_end, IGNORE_INDEX)
        return ShardedBatch(
            input_ids=self.split(input_ids, pad_value=pad_token_id),
            position_ids=self.split(position_ids),
            labels=self.split(shifted, pad_value=IGNORE_INDEX),
            segment_ids=None if segment_ids is None else self.split(segment_ids, pad_value=-1),
            num_valid_tokens=int((shifted != IGNORE_INDEX).sum()),
        )

    def causal_lm_loss(self, logits: torch.Tensor, batch: ShardedBatch) -> torch.Tensor:
        """Mean token loss of the whole global batch; backward gives this rank's share.

        logits: [b, S/sp, vocab] for ``batch``. The value is the sum of token losses over all sp
        ranks divided by ``batch.num_valid_tokens``; its gradient is that of this rank's sum
        alone, so after ``backward`` the gradients must be summed over sp
        (:meth:`sum_gradients`).
        """
        if batch.num_valid_tokens == 0:
            raise ValueError("the batch has no token with a label: its loss is undefined")
        local = F.cross_entropy(
            logits.float().flatten(0, 1),
            batch.labels.flatten(),
            ignore_index=IGNORE_INDEX,
            reduction="sum",
        )
        total = local.detach().clone()
        if self.sp > 1:
            comm_stats.all_reduce_sum(total, self.groups.sp, "sp")
        return (local + (total - local.detach())) / batch.num_valid_tokens

    def sum_gradients(self, model: torch.nn.Module) -> None:
        """Sum every parameter gradient over the sp group (in place), one all-reduce per dtype.

        Data parallelism stays the caller's: reduce over the dp group as usual after this. (A
        torch DDP spanning dp × sp averages over ``dp·sp`` ranks; multiplying the loss by ``sp``
        makes that equal to this sum followed by a dp average.)
        """
        if self.sp == 1:
            return
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for param in model.parameters():
            if param.grad is not None:
                by_dtype.setdefault(param.grad.dtype, []).append(param.grad)
        for grads in by_dtype.values():
            flat = torch.cat([g.reshape(-1) for g in grads])
            comm_stats.all_reduce_sum(flat, self.groups.sp, "sp")
            offset = 0
            for g in grads:
                g.copy_(flat[offset : offset + g.numel()].view_as(g))
                offset += g.numel()
