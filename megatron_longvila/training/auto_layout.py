"""``parallel: auto``: the layout a run's YAML leaves to the planner, chosen for an allocation.

The planner (:mod:`megatron_longvila.planning.planner`) prices every tp × ulysses × ring × pp
layout of the LLM on the allocation with the H100 cluster model
(:data:`~megatron_longvila.planning.clusters.H100_NODES`, ``nproc_per_node`` GPUs per
node), for the YAML's ``data.max_seq_length``, ``data.micro_batch_size`` and
``run.micro_batches_per_step`` (per data-parallel rank), and the optimizer shardings the trainer
runs (replicated, or Megatron's distributed optimizer), with and without full recomputation.
The vision tower and projector enter as memory set aside on every GPU for their weights,
gradients and Adam states (counted replicated: an upper bound under the distributed optimizer);
their compute and activations are not priced. The fastest plan per token becomes an explicit
``parallel`` section, checked by the trainer's own
:func:`~megatron_longvila.training.config.check_layout`. An explicit layout (a ``parallel``
mapping, or ``parallel.*`` overrides) is never replaced.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import yaml

from megatron_longvila.models.config import LongVILAConfig
from megatron_longvila.planning.clusters import H100_NODES
from megatron_longvila.planning.cost_model import Precision
from megatron_longvila.planning.planner import BF16, NoLayoutFits, Plan, Search, Workload, choose
from megatron_longvila.planning.simulator import Cluster
from megatron_longvila.planning.workload import GPTShape
from megatron_longvila.training.config_io import ConfigError

GiB = 2**30


@dataclass(frozen=True)
class AutoLayout:
    """The chosen plan, the runner-up, and the ``parallel`` section the run trains with."""

    chosen: Plan
    runner_up: Plan | None
    cluster: Cluster
    reserved_bytes: float
    parallel: dict[str, Any]

    def describe(self) -> list[str]:
        usable = self.cluster.memory_bytes * self.cluster.memory_usable / GiB  # for the LLM
        lines = [
            f"# parallel: auto, planned on the cluster model: {self.cluster.name}",
            f"#   {self.reserved_bytes / GiB:.1f} GiB per GPU set aside for the vision tower and "
            "projector states; LLM memory and step time from the cost model "
            "(python tools/simulate_sp.py prints its assumptions)",
        ]
        for name, plan in (("chosen", self.chosen), ("runner-up", self.runner_up)):
            if plan is None:
                lines.append(f"#   {name}: none (no other layout fits)")
                continue
            s = plan.strategy
            sharding = {"none": "replicated optimizer", "zero1": "distributed optimizer"}
            lines.append(
                f"#   {name}: tp={s.tp} ulysses={s.ulysses} ring={s.ring} pp={s.pp} dp={s.dp}, "
                f"{sharding.get(plan.training.sharding, plan.training.sharding)}, "
                f"{'full recompute' if plan.training.recompute else 'no recompute'} "
                f"— predicted step {plan.seconds:.2f} s "
                f"({plan.tokens_per_step / plan.seconds:,.0f} tokens/s), "
                f"{plan.memory['total'] / GiB:.1f} GiB per GPU of {usable:.1f} usable"
            )
        return lines


def llm_shape(arch: LongVILAConfig) -> GPTShape:
    llm = arch.llm
    return GPTShape(
        layers=llm.num_layers,
        hidden=llm.hidden_size,
        heads=llm.num_heads,
        kv_heads=llm.num_kv_heads,
        ffn_hidden=llm.ffn_hidden_size,
        vocab=llm.padded_vocab_size,
    )


def vision_parameters(arch: LongVILAConfig) -> int:
    """Parameters of the vision tower (SigLIP ViT with biases) and the projector."""
    v, hidden = arch.vision, arch.llm.hidden_size
    h, f = v.hidden_size, v.ffn_hidden_size
    layer = 4 * h * h + 2 * h * f + 9 * h + f  # QKV, output, MLP (with biases), two LayerNorms
    patches = (v.image_size // v.patch_size) ** 2
    embedding = v.num_channels * v.patch_size**2 * h + h + patches * h
    projector = 2 * 4 * h + 4 * h * hidden + hidden + hidden * hidden + hidden
    return v.num_layers * layer + embedding + 2 * h + projector


def plan_layout(
    tree: dict[str, Any], arch: LongVILAConfig, nnodes: int, nproc_per_node: int
) -> AutoLayout:
    """The fastest layout for the YAML ``tree`` on ``nnodes × nproc_per_node`` GPUs; raises
    :class:`ConfigError` with the planner's refusal when nothing fits."""
    data = tree.get("data") or {}
    run = tree.get("run") or {}
    seq = data.get("max_seq_length")
    if not isinstance(seq, int) or seq < 1:
        raise ConfigError("parallel: auto needs data.max_seq_length (the longest row) to plan")
    precision = Precision.of("float32") if run.get("precision") == "fp32" else BF16
    workload = Workload(
        llm_shape(arch),
        seq,
        micro_batches=int(run.get("micro_batches_per_step", 1)),
        batch=int(data.get("micro_batch_size", 1)),
        precision=precision,
    )
    frozen = set((tree.get("model") or {}).get("freeze") or [])
    trained = precision.weight + precision.grad + 12  # weights, gradients, Adam (fp32 master)
    per_param = precision.weight if {"vision_tower", "mm_projector"} <= frozen else trained
    reserved = vision_parameters(arch) * per_param
    usable = H100_NODES.memory_bytes * H100_NODES.memory_usable - reserved
    cluster = replace(
        H100_NODES,
        gpus_per_node=nproc_per_node,
        memory_bytes=usable / H100_NODES.memory_usable,
        name=f"{H100_NODES.name}; {nproc_per_node} GPUs per node",
    )
    vision_heads = arch.vision.num_heads
    search = Search(
        tp_choices=tuple(t for t in (1, 2, 4, 8) if vision_heads % t == 0),
        shardings=("none", "zero1"),
        tp_sequence_parallel=False,
    )
    try:
        chosen, runner_up = choose(workload, cluster, nnodes * nproc_per_node, search)
    except NoLayoutFits as exc:
        raise ConfigError(f"parallel: auto: {exc}") from None
    s = chosen.strategy
    parallel = {
        "tp": s.tp,
        "ulysses": s.ulysses,
        "ring": s.ring,
        "pp": s.pp,
        "use_distributed_optimizer": chosen.training.sharding == "zero1",
        "recompute": chosen.training.recompute,
    }
    return AutoLayout(chosen, runner_up, cluster, reserved, parallel)


def as_override(parallel: dict[str, Any]) -> str:
    """The ``parallel={...}`` override that hands a planned layout to the trainer."""
    items = ", ".join(f"{k}: {yaml.safe_dump(v).split(chr(10))[0]}" for k, v in parallel.items())
    return f"parallel={{{items}}}"
