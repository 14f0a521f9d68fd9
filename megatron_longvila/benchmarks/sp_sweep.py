"""Run a measurement for several SP degrees on gloo ranks or under torchrun; write JSON + table.

The shared front end of the tools that report one row per SP degree (``tools/measure_memory.py``,
``tools/benchmark_generate.py``): ``run_all(settings, run_on_ranks)`` measures every row, where
``run_on_ranks(fn, *args)`` runs ``fn`` on every rank and returns the per-rank results.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from megatron_longvila.benchmarks.report import save_json_and_markdown

Rows = list[dict[str, Any]]


def write_rows(
    stem: str, rows: Rows, settings: Any, world: int, out: Path, table: Callable[..., str]
) -> None:
    """``out/<stem>.json`` (settings, device, rows) and ``out/<stem>.md`` (``table(rows,
    settings, device)``), which is also printed."""
    backend = "CUDA/NCCL" if torch.cuda.is_available() else "CPU/gloo"
    device = f"{world} ranks, {backend}"
    text = table(rows, settings, device)
    data = {"settings": asdict(settings), "device": device, "rows": rows}
    save_json_and_markdown(out, stem, data, text)
    print(text)


def run_sweep(
    stem: str,
    settings: Any,
    world: int,
    out: Path,
    run_all: Callable[[Any, Callable], Rows],
    table: Callable[..., str],
) -> None:
    """Under torchrun, this process is one rank (rank 0 writes); otherwise start ``world`` gloo
    ranks. ``settings.sp_degrees`` must divide the world."""
    if "WORLD_SIZE" in os.environ:
        from megatron_longvila.core import platform

        platform.adapt_megatron_for_cpu()
        platform.init_distributed()
        rows = run_all(settings, lambda fn, *args: [fn(*args)])  # rank 0 reports every row
        if dist.get_rank() == 0:
            write_rows(stem, rows, settings, dist.get_world_size(), out, table)
        dist.destroy_process_group()
        return
    from megatron_longvila.testing import RankPool

    for sp in settings.sp_degrees:
        if world % sp:
            raise SystemExit(f"--world {world} is not a multiple of sp {sp}")
    with RankPool(world) as pool:
        rows = run_all(settings, pool.run)
    write_rows(stem, rows, settings, world, out, table)
