"""Vocab-parallel cross entropy over chunks of tokens, without the whole logits.

The output layer's GEMM and the cross entropy run together, ``chunk`` tokens at a time: each
chunk's logits ``[chunk, V/tp]`` are computed, reduced over the tensor-parallel ranks (max, sum of
exponentials, target logit) and freed. The forward keeps only the hidden states (which the output
layer keeps anyway) and one fp32 log-sum-exp per token; the backward recomputes each chunk's
logits to form ``softmax − onehot`` and its two GEMMs. Peak memory of the loss is one chunk's
logits instead of ``[s, V/tp]`` in fp32 beside the logits in the activation dtype.

The arithmetic is megatron-core's ``vocab_parallel_cross_entropy`` on logits from the output
layer's GEMM, so losses and gradients equal that path up to the order of floating point sums.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def _chunk_logits(hidden: torch.Tensor, weight: torch.Tensor, real_columns: int) -> torch.Tensor:
    """fp32 logits [c, V/tp] of ``hidden`` [c, h]; padding columns (index ≥ ``real_columns``) at
    -inf, so that they take no probability mass."""
    logits = torch.matmul(hidden, weight.t()).float()
    if real_columns < logits.shape[-1]:
        logits[:, max(real_columns, 0) :] = float("-inf")
    return logits


def _all_reduce(tensor: torch.Tensor, op: dist.ReduceOp, group: dist.ProcessGroup | None) -> None:
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(tensor, op=op, group=group)


def _local_targets(labels: torch.Tensor, vocab_start: int, columns: int):
    """Column of each label on this rank and whether it lies here ([c] each)."""
    here = (labels >= vocab_start) & (labels < vocab_start + columns)
    return (labels - vocab_start).clamp(0, columns - 1), here


class _ChunkedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, vocab_start, real_columns, chunk, group, fuse_wgrad):
        n, columns = hidden.shape[0], weight.shape[0]
        losses = torch.zeros(n, dtype=torch.float32, device=hidden.device)
        lse = torch.zeros(n, dtype=torch.float32, device=hidden.device)
        for start in range(0, n, chunk):
            rows = slice(start, start + chunk)
            logits = _chunk_logits(hidden[rows], weight, real_columns)
            peak = logits.max(dim=-1).values
            _all_reduce(peak, dist.ReduceOp.MAX, group)
            logits -= peak.unsqueeze(-1)
            column, here = _local_targets(labels[rows], vocab_start, columns)
            target = logits.gather(1, column.unsqueeze(1)).squeeze(1).masked_fill(~here, 0.0)
            sum_exp = logits.exp_().sum(dim=-1)
            stats = torch.stack([sum_exp, target])
            _all_reduce(stats, dist.ReduceOp.SUM, group)
            lse[rows] = stats[0].log() + peak
            losses[rows] = stats[0].log() - stats[1]
            del logits
        valid = labels >= 0
        ctx.save_for_backward(hidden, weight, labels, lse)
        ctx.layout = (vocab_start, real_columns, chunk, fuse_wgrad)
        return losses.masked_fill_(~valid, 0.0)

    @staticmethod
    def backward(ctx, grad_losses):
        hidden, weight, labels, lse = ctx.saved_tensors
        vocab_start, real_columns, chunk, fuse_wgrad = ctx.layout
        columns = weight.shape[0]
        grad_losses = grad_losses.float().masked_fill(labels < 0, 0.0)
        grad_hidden = torch.empty_like(hidden)
        main_grad = getattr(weight, "main_grad", None)
        into_main_grad = fuse_wgrad and main_grad is not None and main_grad.dtype == torch.float32
        if into_main_grad:
            grad_weight = main_grad  # megatron DDP's fp32 buffer, as gradient_accumulation_fusion
        else:
            grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        for start in range(0, hidden.shape[0], chunk):
            rows = slice(start, start + chunk)
            logits = _chunk_logits(hidden[rows], weight, real_columns)
            grad = logits.sub_(lse[rows].unsqueeze(-1)).exp_()  # softmax
            column, here = _local_targets(labels[rows], vocab_start, columns)
            grad.scatter_add_(1, column.unsqueeze(1), -here.float().unsqueeze(1))
            grad.mul_(grad_losses[rows].unsqueeze(-1))
            grad = grad.to(hidden.dtype)
            grad_hidden[rows] = torch.matmul(grad, weight)
            grad_weight.addmm_(grad.t().float(), hidden[rows].float())
            del logits, grad
        if into_main_grad:
            # megatron DDP's protocol: the hook sees the flag and does not add the returned
            # placeholder; the reduction takes main_grad.
            weight.grad_added_to_main_grad = True
            grad_weight = torch.empty_like(weight)
        else:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None, None, None, None, None


def chunked_vocab_parallel_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    vocab_start: int,
    vocab_size: int,
    chunk_tokens: int,
    tp_group: dist.ProcessGroup | None,
    accumulate_into_main_grad: bool = False,
) -> torch.Tensor:
    """Per-token cross entropy of ``hidden @ weight.T`` against ``labels``, ``chunk_tokens`` rows
    at a time.

    hidden: [n, h], the same on every tensor-parallel rank (its gradient is this rank's part;
            the caller's tensor-parallel region reduces it, as for the output layer's input).
    weight: [V/tp, h], this rank's rows of the output layer (vocabulary ids ``vocab_start`` on);
            rows at ids ≥ ``vocab_size`` are padding and take no probability.
    labels: [n] int64 target ids; negative = no loss (loss and gradient 0).
    Returns [n] fp32 losses.

    The weight gradient is summed over the chunks in fp32. With ``accumulate_into_main_grad``
    and a weight that megatron DDP gave an fp32 ``main_grad``, the chunks add into that buffer
    directly (as megatron's ``gradient_accumulation_fusion`` does); otherwise into a temporary
    fp32 tensor. Not for a weight that is used elsewhere too (tied embeddings): DDP would then
    skip the other use's gradient.
    """
    if hidden.dim() != 2 or labels.shape != hidden.shape[:1]:
        raise ValueError(
            f"hidden {tuple(hidden.shape)} must be [n, h] and labels {tuple(labels.shape)} [n]"
        )
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be positive, got {chunk_tokens}")
    return _ChunkedCrossEntropy.apply(
        hidden,
        weight,
        labels,
        vocab_start,
        vocab_size - vocab_start,
        chunk_tokens,
        tp_group,
        accumulate_into_main_grad,
    )
