"""Best layout of MM-SP, Megatron CP+TP, hierarchical CP, ring-only and Ulysses-only on a cluster.

Default: the LongVILA paper's setting (Llama-3-8B decoder, H100 nodes of 8 GPUs, 32–256 GPUs,
64K–2M tokens, 2M tokens per optimizer step): the planner's best layout and runner-up of each
family, MM-SP's speedups over the best CP+TP and ring-only layouts beside the paper's ranges with
the term that decides each, a sensitivity sweep (overlap, NIC bandwidth, attention efficiency),
and the longest sequence that fits on 128/256 GPUs (Llama-3-8B, Qwen2-7B) with and without
activation recomputation. Every cluster number can be overridden; every assumption is printed.
Writes ``simulate_sp.json``, ``.md``, ``.png``.

    python tools/simulate_sp.py --out runs/simulate_sp
    python tools/simulate_sp.py --ib-gbps 25 --gpus 64 128 --seq 256K 1M --no-sweep
    python tools/simulate_sp.py --calibrate-cpu --world 4 --seq 2048   # fit, measure, vs null
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

from megatron_longvila.benchmarks import study_report
from megatron_longvila.benchmarks.scaling_study import H100_NODES, StudySetup, paper_study
from megatron_longvila.planning.planner import Search
from megatron_longvila.planning.simulator import Link
from megatron_longvila.planning.workload import CPU_SMALL, LLAMA3_8B, strategies_for

GiB = 2**30


def _tokens(text: str) -> int:
    """``65536``, ``64K`` or ``2M``."""
    scale = {"K": 1 << 10, "M": 1 << 20}.get(text[-1].upper(), 1)
    return int(text[:-1] if scale > 1 else text) * scale


def _parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gpus", type=int, nargs="+", default=[32, 64, 128, 256])
    p.add_argument("--seq", type=_tokens, nargs="+", default=None, help="e.g. 64K 1M 2M")
    p.add_argument("--memory-gpus", type=int, nargs="+", default=[128, 256])
    p.add_argument("--tokens-per-step", type=_tokens, default=_tokens("2M"))
    p.add_argument(
        "--sharding", choices=["none", "zero1", "zero3"], nargs="+", default=["zero1", "zero3"]
    )
    p.add_argument("--no-sweep", action="store_true", help="skip the sensitivity sweep")
    for name in ("layers", "hidden", "heads", "kv-heads", "ffn-hidden", "vocab"):
        p.add_argument(f"--{name}", type=int, help="override Llama-3-8B's value")
    cluster = p.add_argument_group("cluster (defaults: the H100 preset)")
    cluster.add_argument("--gpus-per-node", type=int)
    cluster.add_argument("--peak-tflops", type=float)
    cluster.add_argument("--gemm-efficiency", type=float)
    cluster.add_argument("--attention-efficiency", type=float)
    cluster.add_argument("--nvlink-gbps", type=float, help="GB/s per GPU per direction")
    cluster.add_argument("--nvlink-latency-us", type=float)
    cluster.add_argument("--ib-gbps", type=float, help="GB/s per GPU per direction")
    cluster.add_argument("--ib-latency-us", type=float)
    cluster.add_argument("--overlap", type=float, help="fraction of overlappable comm hidden")
    cluster.add_argument("--memory-gib", type=float)
    cpu = p.add_argument_group("calibration on this machine")
    cpu.add_argument("--calibrate-cpu", action="store_true")
    cpu.add_argument("--world", type=int, default=8)
    cpu.add_argument("--rounds", type=int, default=2)
    p.add_argument("--out", type=Path, default=Path("runs/simulate_sp"))
    return p.parse_args()


def _cluster(a: argparse.Namespace):
    c = H100_NODES
    changes = {}
    for arg, field, scale in (
        ("gpus_per_node", "gpus_per_node", 1),
        ("peak_tflops", "peak_flops", 1e12),
        ("gemm_efficiency", "gemm_efficiency", 1),
        ("attention_efficiency", "attention_efficiency", 1),
        ("overlap", "overlap", 1),
        ("memory_gib", "memory_bytes", GiB),
    ):
        if getattr(a, arg) is not None:
            changes[field] = getattr(a, arg) * scale
    for prefix, field in (("nvlink", "intra_node"), ("ib", "inter_node")):
        link = getattr(c, field)
        bandwidth, latency = getattr(a, f"{prefix}_gbps"), getattr(a, f"{prefix}_latency_us")
        if bandwidth is not None or latency is not None:
            changes[field] = Link(
                bandwidth=link.bandwidth if bandwidth is None else bandwidth * 1e9,
                latency=link.latency if latency is None else latency * 1e-6,
            )
    if changes:
        c = replace(c, name=c.name + " (modified: " + ", ".join(sorted(changes)) + ")", **changes)
    return c


def _calibrate_cpu(a: argparse.Namespace) -> None:
    """Fit this machine's rates on ``--world`` gloo ranks, measure every strategy there, and
    report the calibrated model's error beside a null model's, with the fitted parameters."""
    from megatron_longvila.benchmarks import report
    from megatron_longvila.benchmarks.compare import run_comparison
    from megatron_longvila.benchmarks.gpt_step import StepSettings
    from megatron_longvila.core.rank_pool import RankPool

    settings = StepSettings(seq=a.seq[0] if a.seq else 4096)
    strategies = strategies_for(a.world, CPU_SMALL)
    with RankPool(a.world) as pool:
        result = run_comparison(CPU_SMALL, strategies, settings, pool.run, a.rounds)
    result |= {"device": f"{a.world} gloo ranks on this machine", "date": "calibration"}
    report.write(result, a.out, stem="calibration")
    print("Fitted parameters:", "; ".join(result["cluster"]["notes"]))
    print(report.prediction_table(result))
    print(report.speedup_table(result))
    print(report.fit_table(result))


def main() -> None:
    a = _parse()
    if a.calibrate_cpu:
        _calibrate_cpu(a)
        return
    overrides = {
        field: getattr(a, field)
        for field in ("layers", "hidden", "heads", "kv_heads", "ffn_hidden", "vocab")
        if getattr(a, field) is not None
    }
    kwargs = {"seqs": tuple(a.seq)} if a.seq else {}
    study = paper_study(
        shape=replace(LLAMA3_8B, **overrides),
        cluster=_cluster(a),
        setup=StudySetup(a.tokens_per_step, Search(shardings=tuple(a.sharding))),
        gpu_counts=tuple(a.gpus),
        memory_gpu_counts=tuple(a.memory_gpus),
        sweep=not a.no_sweep,
        **kwargs,
    )
    print(study_report.write(study, a.out))


if __name__ == "__main__":
    main()
