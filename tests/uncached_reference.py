"""The reference for KV-cached generation: the model's plain forward over the whole sequence."""

from __future__ import annotations

import torch

from megatron_longvila.data.batch import IGNORE_INDEX, MultimodalBatch


def uncached_logits(model, ids: torch.Tensor, media: list[torch.Tensor]) -> torch.Tensor:
    """Logits [vocab] fp32 after the whole sequence ``ids`` [s] (one placeholder per item of
    ``media``, each [frames, C, H, W]), by ``LongVILAModel.forward`` at SP = 1, no cache."""
    row = ids.reshape(1, -1)
    batch = MultimodalBatch(
        input_ids=row,
        labels=torch.full_like(row, IGNORE_INDEX),
        segment_ids=torch.zeros_like(row),
        media=media,
        keys=[["reference"]],
    )
    with torch.no_grad():
        logits = model(model.prepare_inputs(batch), return_logits=True)  # [1, S, vocab]
    frames = sum(int(m.shape[0]) for m in media)
    length = ids.numel() - len(media) + frames * model.cfg.tokens_per_frame
    return logits[0, length - 1].float()
