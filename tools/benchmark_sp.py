"""Benchmark MM-SP against ring-only SP, Ulysses-only SP and Megatron CP+TP on one GPT and sequence.

Every strategy trains the same megatron-core GPT decoder on the same sequence with all ranks
(``megatron_longvila.benchmarks``): step time, tokens/s, bytes per rank per layer, peak memory and
attention load balance, plus (on CPU) the simulator calibrated on this machine and its predicted
step times and speedups beside the measured ones. Writes ``benchmark_sp.json``, ``.md``, ``.png``.

    python tools/benchmark_sp.py --world 8 --seq 4096 --out runs/benchmark_sp   # gloo ranks
    torchrun --nproc-per-node 8 tools/benchmark_sp.py --preset llama3-8b --layers 4 --seq 65536

``--attention-only`` times the attention alone: our Ulysses-only, ring-only and 2D attention beside
DeepSpeed-Ulysses and yunchang's USP when they are installed (``pip install .[peers]``), on the
same inputs in alternating rounds; writes ``attention_only.json`` and ``.md``.

    python tools/benchmark_sp.py --attention-only --world 4 --seq 4096
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_longvila.benchmarks import report
from megatron_longvila.benchmarks.compare import run_comparison
from megatron_longvila.benchmarks.gpt_step import StepSettings
from megatron_longvila.core.rank_pool import rank_runner
from megatron_longvila.planning.workload import (
    CPU_SMALL,
    LLAMA3_8B,
    GPTShape,
    strategies_for,
)

PRESETS = {"small": CPU_SMALL, "llama3-8b": LLAMA3_8B}


def _parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="small")
    for name in ("layers", "hidden", "heads", "kv-heads", "ffn-hidden", "vocab"):
        p.add_argument(f"--{name}", type=int, help="override the preset's value")
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument(
        "--dtype",
        choices=["float32", "bfloat16"],
        default=None,
        help="default: bfloat16 on GPUs, float32 on CPU",
    )
    p.add_argument(
        "--inner",
        type=int,
        default=None,
        help="ranks per node: compare only 2D inner×rest and CP+TP tp=inner",
    )
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--no-calibrate", action="store_true", help="skip the simulator calibration")
    p.add_argument("--world", type=int, default=8, help="gloo ranks to start without torchrun")
    p.add_argument("--attention-only", action="store_true", help="attention alone, with peers")
    p.add_argument("--out", type=Path, default=Path("runs/benchmark_sp"))
    return p.parse_args()


def _shape(a: argparse.Namespace) -> GPTShape:
    overrides = {
        field: getattr(a, field)
        for field in ("layers", "hidden", "heads", "kv_heads", "ffn_hidden", "vocab")
        if getattr(a, field) is not None
    }
    return replace(PRESETS[a.preset], **overrides)


def _device(world: int) -> str:
    if torch.cuda.is_available():
        return f"{world} × {torch.cuda.get_device_name()}, NCCL"
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return (
        f"{world} gloo ranks on {os.cpu_count()} CPU cores ({platform.processor() or 'cpu'}, "
        f"load average {load} at the end)"
    )


def _attention_only(a: argparse.Namespace) -> None:
    from megatron_longvila.benchmarks import attention_peers as peers

    shape = _shape(a)
    settings = peers.AttentionSettings(
        batch=a.batch,
        seq=a.seq,
        heads=shape.heads,
        head_dim=shape.head_dim,
        repeats=a.repeats,
        warmup=a.warmup,
    )
    with rank_runner(a.world) as (run, reporter):
        world = dist.get_world_size() if dist.is_initialized() else a.world
        result = peers.run_attention_comparison(peers.entries_for(world), settings, run, a.rounds)
        if reporter:
            result["device"] = _device(world)
            text = (
                f"Attention alone: batch {a.batch} × {a.seq} tokens, {shape.heads} heads × "
                f"{shape.head_dim}, causal, fp32; {result['device']}; median over "
                f"{a.rounds} alternating rounds of {a.repeats} passes.\n\n"
                + peers.attention_table(result)
                + "\n"
            )
            report.save_json_and_markdown(a.out, "attention_only", result, text)
            print(text)


def main() -> None:
    a = _parse()
    if a.attention_only:
        _attention_only(a)
        return
    shape = _shape(a)
    on_gpu = torch.cuda.is_available()
    settings = StepSettings(
        batch=a.batch,
        seq=a.seq,
        dtype=a.dtype or ("bfloat16" if on_gpu else "float32"),
        repeats=a.repeats,
        warmup=a.warmup,
    )
    calibrate = not a.no_calibrate and not on_gpu  # the calibration fits CPU/gloo rates
    with rank_runner(a.world) as (run, reporter):
        world = dist.get_world_size() if dist.is_initialized() else a.world
        strategies = strategies_for(world, shape, a.inner)
        result = run_comparison(shape, strategies, settings, run, a.rounds, calibrate)
        if reporter:
            _finish(result, world, a.out)


def _finish(result: dict, world: int, out: Path) -> None:
    result["device"] = _device(world)
    result["date"] = datetime.datetime.now().isoformat(timespec="minutes")
    print(report.write(result, out))


if __name__ == "__main__":
    main()
