"""Packed rows (several samples, segment ids) against unpacked rows of the same length.

Times forward + backward of MM-SP attention and reports peak memory per rank, for each sp degree;
writes ``benchmark_packed.json`` and ``benchmark_packed.md`` (see
``megatron_longvila.benchmarks.packed_rows``)::

    python tools/benchmark_packed.py --world 4 --sp 1 4 --seq 16384 --out docs/benchmarks
    torchrun --nproc-per-node 4 tools/benchmark_packed.py --sp 1 4
"""

from __future__ import annotations

import argparse
from pathlib import Path

from megatron_longvila.benchmarks.packed_rows import Settings, markdown_table, run_all
from megatron_longvila.benchmarks.sp_sweep import run_sweep


def main() -> None:
    defaults = Settings()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sp", type=int, nargs="+", default=list(defaults.sp_degrees))
    for name in ("seq", "samples", "heads", "kv_heads", "head_dim", "repeats", "seed"):
        p.add_argument(f"--{name.replace('_', '-')}", type=int, default=getattr(defaults, name))
    p.add_argument("--world", type=int, default=4, help="gloo ranks to start without torchrun")
    p.add_argument("--out", type=Path, default=Path("runs/benchmark_packed"))
    a = p.parse_args()
    settings = Settings(
        sp_degrees=tuple(a.sp),
        seq=a.seq,
        samples=a.samples,
        heads=a.heads,
        kv_heads=a.kv_heads,
        head_dim=a.head_dim,
        repeats=a.repeats,
        seed=a.seed,
    )
    run_sweep("benchmark_packed", settings, a.world, a.out, run_all, markdown_table)


if __name__ == "__main__":
    main()
