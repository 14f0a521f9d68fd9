"""Tiny end-to-end demo on CPU: a megatron-core GPT trained with TP=2 × PP=2 on 4 gloo ranks.

Run through ``make demo`` (or ``torchrun --standalone --nproc-per-node 4 examples/demo.py``).
"""

from __future__ import annotations

import torch
from megatron.core import parallel_state
from tqdm import tqdm

from megatron_longvila.core import platform
from megatron_longvila.training.tiny_gpt import TinyGPTSettings, train


def main() -> None:
    platform.adapt_megatron_for_cpu()
    platform.init_distributed()
    torch.set_num_threads(1)
    world = torch.distributed.get_world_size()
    tp = 2 if world % 2 == 0 else 1
    pp = 2 if world % (2 * tp) == 0 else 1
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp
    )
    rank0 = torch.distributed.get_rank() == 0
    steps = 30
    bar = tqdm(total=steps, desc=f"tiny GPT TP={tp} PP={pp}", disable=not rank0)

    def progress(step: int, loss: float) -> None:
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.3f}")

    losses = train(TinyGPTSettings(), steps, progress=progress)
    bar.close()
    if rank0:
        print(f"loss {losses[0]:.3f} -> {losses[-1]:.3f} over {steps} steps on {world} ranks")
    parallel_state.destroy_model_parallel()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
