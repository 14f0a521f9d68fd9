"""The simulator on the paper's settings: speedups over a grid of GPU counts and sequence lengths,
and the longest sequence that fits per GPU count, with every assumption written down.

LongVILA's claims (arXiv 2408.10188): MM-SP is 2.1–5.7× faster than ring-style (zigzag ring) SP
and 1.1–1.4× faster than Megatron-LM CP+TP in text-only training, and trains 2M-token sequences
on 256 GPUs without gradient checkpointing. The study below puts the simulator's predictions for
a Llama-3-8B decoder on H100 nodes beside those numbers.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from megatron_longvila.benchmarks import cost_model, simulator
from megatron_longvila.benchmarks.cost_model import Precision, Training
from megatron_longvila.benchmarks.simulator import Cluster, Link
from megatron_longvila.benchmarks.workload import LLAMA3_8B, GPTShape, Strategy

GiB = 2**30
K = 1024

PAPER_RANGES = {"vs ring-only": (2.1, 5.7), "vs CP+TP": (1.1, 1.4)}

H100_NODES = Cluster(
    name="H100 SXM 80 GB, 8 per node (NVLink 4), one 400 Gb/s InfiniBand NIC per GPU",
    gpus_per_node=8,
    peak_flops=989e12,
    gemm_efficiency=0.55,
    attention_efficiency=0.40,
    intra_node=Link(bandwidth=350e9, latency=5e-6),
    inter_node=Link(bandwidth=45e9, latency=10e-6),
    overlap=0.9,
    memory_bytes=80 * GiB,
    memory_usable=0.9,
    notes=(
        "989 TFLOP/s dense bf16 peak; GEMMs at 55% of it, flash attention at 40% (FlashAttention-2 "
        "class kernels); elementwise work folded into these efficiencies",
        "NVLink: 350 GB/s per GPU per direction achievable, 5 us per message; InfiniBand NDR: "
        "45 GB/s per GPU per direction achievable, 10 us per message",
        "90% of each overlappable transfer (ring K/V and dK/dV hops, gradient and ZeRO traffic) "
        "hides behind compute; Ulysses all-to-alls and TP collectives do not overlap",
        "90% of the 80 GiB usable for the step (CUDA context, allocator fragmentation, buffers)",
    ),
)


@dataclass(frozen=True)
class Setup:
    """How the strategies train in the study: the same for all of them, so that the comparison
    is one of sequence parallelism alone (CP+TP adds Megatron's TP sequence parallelism)."""

    sharding: str = "zero3"
    precision: Precision = field(default_factory=lambda: Precision(activation=2, weight=2))

    def training(self, strategy: Strategy, recompute: bool) -> Training:
        return Training(
            sharding=self.sharding,
            recompute=recompute,
            tp_sequence_parallel=strategy.kind == "CP+TP",
            overlap_grad_sync=True,
        )

    def assumptions(self) -> list[str]:
        return [
            f"every strategy trains with {_SHARDING_WORDS[self.sharding]}, overlapped with "
            "compute (the LongVILA paper trains with DeepSpeed ZeRO-3); one sequence per "
            "optimizer step",
            "step times without activation recomputation where the step fits, with it where it "
            "fits only so (marked R)",
            "CP+TP: tensor parallelism inside each node with Megatron's TP sequence parallelism, "
            "p2p K/V ring across nodes; MM-SP 2D: Ulysses inside each node, ring across nodes",
            "bf16 activations and weights, fp32 gradient reduction and fp32 dK/dV accumulators "
            "in the ring; Adam with fp32 master weights and moments (12 bytes per parameter)",
            "one sequence per step (batch 1), causal attention split zigzag, no padding tokens",
        ]


_SHARDING_WORDS = {
    "none": "replicated weights, gradients and optimizer states",
    "zero1": "the optimizer states sharded over all GPUs of the sequence (Megatron's distributed "
    "optimizer, ZeRO-1)",
    "zero3": "weights, gradients and optimizer states sharded over all GPUs of the sequence "
    "(ZeRO-3/FSDP: two weight all-gathers and a gradient reduce-scatter per step)",
}


def strategies_at(gpus: int, shape: GPTShape, gpus_per_node: int) -> dict[str, Strategy]:
    """The four strategies on ``gpus`` GPUs; those that cannot split ``shape`` are left out.

    MM-SP 2D puts a Ulysses group on each node and rings across nodes; CP+TP puts tensor
    parallelism on each node and the context-parallel ring across nodes.
    """
    inner = min(gpus_per_node, gpus)
    candidates = {
        "MM-SP 2D": Strategy("2D", ulysses=inner, ring=gpus // inner) if gpus > inner else None,
        "ring-only": Strategy("ring-only", ring=gpus),
        "Ulysses-only": Strategy("ulysses-only", ulysses=gpus),
        "CP+TP": Strategy("CP+TP", tp=inner, ring=gpus // inner) if gpus > inner else None,
    }
    if gpus <= inner:  # one node: MM-SP is Ulysses over the node
        candidates["MM-SP 2D"] = Strategy("ulysses-only", ulysses=gpus)
    found = {}
    for name, strategy in candidates.items():
        if strategy is None:
            continue
        try:
            strategy.check(shape)
        except ValueError:
            continue
        found[name] = strategy
    return found


def _step(shape, strategy, seq, cluster, setup) -> dict[str, Any] | None:
    """Predicted step without recomputation if it fits, else with it, else None."""
    for recompute in (False, True):
        training = setup.training(strategy, recompute)
        if simulator.fits(shape, strategy, 1, seq, cluster, setup.precision, training):
            parts = simulator.predict_step(
                shape, strategy, 1, seq, cluster, setup.precision, training
            )
            memory = cost_model.memory_per_rank(shape, strategy, 1, seq, setup.precision, training)
            return {
                "seconds": parts["total"],
                "parts": parts,
                "recompute": recompute,
                "memory_bytes": memory["total"],
            }
    return None


def speed_grid(
    shape: GPTShape,
    cluster: Cluster,
    setup: Setup,
    gpu_counts: list[int],
    seqs: list[int],
) -> list[dict[str, Any]]:
    """Predicted step of every strategy at every (GPUs, sequence), and MM-SP's speedups."""
    cells = []
    for gpus in gpu_counts:
        strategies = strategies_at(gpus, shape, cluster.gpus_per_node)
        for seq in seqs:
            if seq % (2 * gpus):
                continue
            steps = {name: _step(shape, s, seq, cluster, setup) for name, s in strategies.items()}
            cell = {"gpus": gpus, "seq": seq, "steps": steps}
            mmsp = steps.get("MM-SP 2D")
            for baseline, key in (("ring-only", "vs ring-only"), ("CP+TP", "vs CP+TP")):
                other = steps.get(baseline)
                if mmsp and other:
                    cell[key] = other["seconds"] / mmsp["seconds"]
            cells.append(cell)
    return cells


def longest_sequences(
    shape: GPTShape, cluster: Cluster, setup: Setup, gpu_counts: list[int]
) -> list[dict[str, Any]]:
    """Longest sequence per GPU count and strategy, without and with full recomputation."""
    rows = []
    for gpus in gpu_counts:
        row: dict[str, Any] = {"gpus": gpus}
        for name, strategy in strategies_at(gpus, shape, cluster.gpus_per_node).items():
            row[name] = {
                f"recompute={recompute}": simulator.longest_sequence(
                    shape,
                    strategy,
                    cluster,
                    setup.precision,
                    setup.training(strategy, recompute),
                )
                for recompute in (False, True)
            }
        rows.append(row)
    return rows


def paper_study(
    shape: GPTShape = LLAMA3_8B,
    cluster: Cluster = H100_NODES,
    setup: Setup | None = None,
    gpu_counts: tuple[int, ...] = (32, 64, 128, 256),
    seqs: tuple[int, ...] = (64 * K, 128 * K, 256 * K, 512 * K, 1024 * K, 2048 * K),
    memory_gpu_counts: tuple[int, ...] = (8, 16, 32, 64, 128, 256),
) -> dict[str, Any]:
    setup = setup or Setup()
    grid = speed_grid(shape, cluster, setup, list(gpu_counts), list(seqs))
    ranges = {}
    for key in PAPER_RANGES:
        values = [c[key] for c in grid if key in c]
        ranges[key] = (min(values), max(values)) if values else None
    return {
        "shape": shape.as_dict(),
        "cluster": cluster.as_dict(),
        "assumptions": list(cluster.notes) + setup.assumptions(),
        "paper_ranges": PAPER_RANGES,
        "predicted_ranges": ranges,
        "speed_grid": grid,
        "longest_sequences": longest_sequences(shape, cluster, setup, list(memory_gpu_counts)),
        "setup": asdict(setup),
    }
