"""Run a measurement for several SP degrees on gloo ranks or under torchrun; write JSON + table.

The shared front end of the tools that report one row per SP degree (``tools/measure_memory.py``,
``tools/benchmark_generate.py``): ``run_all(settings, run_on_ranks)`` measures every row, where
``run_on_ranks(fn, *args)`` runs ``fn`` on every rank and returns the per-rank results.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from megatron_longvila.benchmarks.report import save_json_and_markdown
from megatron_longvila.core.rank_pool import rank_runner

Rows = list[dict[str, Any]]


def split_of(sp: int) -> tuple[int, int]:
    """(ulysses, ring) used for an sp degree: Ulysses up to 2, ring for the rest."""
    ulysses = 2 if sp % 2 == 0 else 1
    return ulysses, sp // ulysses


def with_ratios(rows: Rows, kinds: tuple[str, ...]) -> Rows:
    """Adds ``<kind>_ratio``: each row's ``<kind>_bytes_max`` over the sp = 1 row's (None when
    sp = 1 was not measured)."""
    base = next((r for r in rows if r["sp"] == 1), None)
    for r in rows:
        for kind in kinds:
            key = f"{kind}_bytes_max"
            r[f"{kind}_ratio"] = r[key] / base[key] if base else None
    return rows


def ratio_text(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"


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
    """Under torchrun, this process is one rank (rank 0 reports every row); otherwise start
    ``world`` gloo ranks. ``settings.sp_degrees`` must divide the world."""
    with rank_runner(world) as (run, reporter):
        world = dist.get_world_size() if dist.is_initialized() else world
        for sp in settings.sp_degrees:
            if world % sp:
                raise SystemExit(f"world size {world} is not a multiple of sp {sp}")
        rows = run_all(settings, run)
        if reporter:
            write_rows(stem, rows, settings, world, out, table)
