"""The planner on the paper's settings: the best layout of each family over a grid of GPU counts
and sequence lengths, MM-SP's ratio to the best CP+TP and the best ring-only layout with the term
of the model that decides it, a sensitivity sweep, and the longest sequence that fits, with every
assumption written down.

LongVILA's claims (arXiv 2408.10188): MM-SP is 2.1–5.7× faster than ring-style (zigzag ring) SP
and 1.1–1.4× faster than Megatron-LM CP+TP in text-only training, and trains 2M-token sequences
on 256 GPUs without gradient checkpointing. The study puts the model's predictions for a
Llama-3-8B decoder on H100 nodes beside those numbers; nothing in it is tuned toward them.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from megatron_longvila.planning import planner
from megatron_longvila.planning.clusters import H100_NODES
from megatron_longvila.planning.cost_model import Precision
from megatron_longvila.planning.planner import BF16, Plan, Search, Workload
from megatron_longvila.planning.simulator import Cluster
from megatron_longvila.planning.workload import LLAMA3_8B, QWEN2_7B, GPTShape

GiB = 2**30
K = 1024
M = 1024 * K

PAPER_RANGES = {"vs ring-only": (2.1, 5.7), "vs CP+TP": (1.1, 1.4)}
BASELINES = {"vs ring-only": "ring-only", "vs CP+TP": "CP+TP"}


@dataclass(frozen=True)
class StudySetup:
    """What every layout of the study trains: ``tokens_per_step`` tokens per optimizer step in
    sequences of the cell's length (at least one sequence), searched over ``search``."""

    tokens_per_step: int = 2 * M
    search: Search = field(default_factory=Search)
    precision: Precision = BF16

    def workload(self, shape: GPTShape, seq: int) -> Workload:
        sequences = max(1, self.tokens_per_step // seq)
        return Workload(shape, seq, sequences_per_step=sequences, precision=self.precision)

    def assumptions(self) -> list[str]:
        s = self.search
        return [
            f"each optimizer step trains {self.tokens_per_step // K}K tokens (one sequence when "
            "the sequence is longer), one sequence per micro-batch; every layout of a family is "
            f"searched: tp in {list(s.tp_choices)} (inside a node), every ulysses × ring, pp in "
            f"{list(s.pp_choices)} (1F1B; a stage priced as L/pp layers plus the embedding and "
            "output layer), dp for the rest",
            f"optimizer sharding searched over {list(s.shardings)}: zero1 = Megatron's "
            "distributed optimizer (reduce-scatter of fp32 gradients, all-gather of the weights "
            "once per step), zero3 = weights, gradients and optimizer states sharded (two weight "
            "all-gathers and a gradient reduce-scatter per micro-batch), both over dp × sp",
            "full activation recomputation only where the layout does not fit without it "
            "(marked R); memory per GPU from the cost model's formulas (Transformer Engine "
            "kernels, RoPE unfused as the LongVILA LLM runs it; the model's default memory "
            "options: loss in chunks, MLP activation recomputed)",
            "tp > 1 runs with Megatron's TP sequence parallelism in every family; MM-SP with TP "
            "and Megatron's hierarchical CP (a2a+p2p) have the same schedule in this model",
            "bf16 activations and weights, fp32 gradient reduction and fp32 dK/dV accumulators "
            "in the ring; Adam with fp32 master weights and moments (12 bytes per parameter)",
            "causal attention split zigzag, no padding tokens; the vision tower is not priced "
            "(text-only, as the paper's comparison)",
        ]


def deciding_term(plan: Plan, baseline: Plan) -> dict[str, Any]:
    """The part of the step (``simulator.predict_step``'s keys) whose difference per token most
    favours the faster of the two, and that difference in seconds of ``plan``'s step."""
    scale = plan.tokens_per_step
    diffs = {
        k: (baseline.parts[k] / baseline.tokens_per_step - plan.parts[k] / scale) * scale
        for k in plan.parts
        if k != "total"
    }
    wins = baseline.seconds_per_token >= plan.seconds_per_token
    term = max(diffs, key=diffs.get) if wins else min(diffs, key=diffs.get)
    return {"term": term, "seconds": diffs[term], "mmsp_wins": wins}


def study_cell(
    shape: GPTShape, cluster: Cluster, setup: StudySetup, gpus: int, seq: int
) -> dict[str, Any]:
    """Best and runner-up of each family at (``gpus``, ``seq``), MM-SP's ratios to the best
    CP+TP and ring-only plans (their seconds per token over MM-SP's) and the deciding terms."""
    workload = setup.workload(shape, seq)
    found = planner.best_per_family(workload, cluster, gpus, setup.search)
    cell: dict[str, Any] = {
        "gpus": gpus,
        "seq": seq,
        "tokens_per_step": seq * workload.sequences_per_step,
        "families": {f: [p.as_dict() for p in plans] for f, plans in found.items()},
    }
    mmsp = found.get("MM-SP", [None])[0]
    for key, family in BASELINES.items():
        other = found.get(family, [None])[0]
        if mmsp and other:
            cell[key] = other.seconds_per_token / mmsp.seconds_per_token
            cell[f"{key} decided by"] = deciding_term(mmsp, other)
    return cell


def speed_grid(
    shape: GPTShape, cluster: Cluster, setup: StudySetup, gpu_counts, seqs
) -> list[dict[str, Any]]:
    return [study_cell(shape, cluster, setup, g, s) for g in gpu_counts for s in seqs]


def ratio_ranges(grid: list[dict[str, Any]]) -> dict[str, tuple[float, float] | None]:
    ranges = {}
    for key in PAPER_RANGES:
        values = [c[key] for c in grid if key in c]
        ranges[key] = (min(values), max(values)) if values else None
    return ranges


def sensitivity_clusters(cluster: Cluster) -> list[tuple[str, float, Cluster]]:
    """(parameter, value, cluster) of the sweep: ring/gradient overlap 0.5–0.9, NIC 25–45 GB/s,
    attention efficiency ±25%."""
    out = [("overlap", v, replace(cluster, overlap=v)) for v in (0.5, 0.7, 0.9)]
    out += [
        ("NIC GB/s", v, replace(cluster, inter_node=replace(cluster.inter_node, bandwidth=v * 1e9)))
        for v in (25, 35, 45)
    ]
    efficiency = cluster.attention_efficiency
    out += [
        ("attention efficiency", v, replace(cluster, attention_efficiency=efficiency * v))
        for v in (0.75, 1.0, 1.25)
    ]
    return out


def sensitivity(
    shape: GPTShape, cluster: Cluster, setup: StudySetup, gpu_counts, seqs
) -> list[dict[str, Any]]:
    """MM-SP's ratio ranges over the grid for each value of each swept parameter."""
    rows = []
    for parameter, value, swept in sensitivity_clusters(cluster):
        grid = speed_grid(shape, swept, setup, gpu_counts, seqs)
        rows.append({"parameter": parameter, "value": value, "ranges": ratio_ranges(grid)})
    return rows


def paper_study(
    shape: GPTShape = LLAMA3_8B,
    cluster: Cluster = H100_NODES,
    setup: StudySetup | None = None,
    gpu_counts: tuple[int, ...] = (32, 64, 128, 256),
    seqs: tuple[int, ...] = (64 * K, 128 * K, 256 * K, 512 * K, 1024 * K, 2048 * K),
    memory_gpu_counts: tuple[int, ...] = (128, 256),
    sweep: bool = True,
) -> dict[str, Any]:
    setup = setup or StudySetup()
    grid = speed_grid(shape, cluster, setup, gpu_counts, seqs)
    fit_search = replace(setup.search, families=("MM-SP", "CP+TP", "ring-only"))
    return {
        "shape": shape.as_dict(),
        "cluster": cluster.as_dict(),
        "assumptions": list(cluster.notes) + setup.assumptions(),
        "paper_ranges": PAPER_RANGES,
        "predicted_ranges": ratio_ranges(grid),
        "speed_grid": grid,
        "sensitivity": sensitivity(shape, cluster, setup, gpu_counts, seqs) if sweep else [],
        "longest_sequences": planner.fit_length_table(
            {"llama3-8b": LLAMA3_8B, "qwen2-7b": QWEN2_7B}, cluster, memory_gpu_counts, fit_search
        ),
        "tokens_per_step": setup.tokens_per_step,
    }
