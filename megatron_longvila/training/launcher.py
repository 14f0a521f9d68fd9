"""Resolve the torchrun command of a training run from its YAML and the cluster allocation.

Used by ``examples/slurm/*.sbatch`` (one process per node under ``srun``, each starting
``torchrun`` with a c10d rendezvous on the first node) and by hand. ``--dry-run`` prints the
resolved command and the parallel layout without starting anything, after checking the layout
against the allocation and the model (the trainer's own check). ``--nnodes`` stands in for
SLURM's node count, e.g. to plan a large allocation from a laptop.

With ``parallel: auto`` in the YAML the planner picks the layout for the allocation
(:mod:`.auto_layout`); the plan, its predicted step time and memory per GPU and the runner-up
are printed, and the command hands the layout to the trainer as a ``parallel={...}`` override.

    python -m megatron_longvila.training.launcher --config examples/configs/stage5_long_sft.yaml \
        --nproc-per-node 8 --nnodes 32 --dry-run [key=value ...]
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
from dataclasses import dataclass

import yaml

from megatron_longvila.models.config import ConfigError as ModelConfigError
from megatron_longvila.training import auto_layout
from megatron_longvila.training.config import (
    AUTO_LAYOUT,
    ModelSection,
    OptimizerSection,
    ParallelConfig,
    check_layout,
    explicit_layout_wins,
)
from megatron_longvila.training.config_io import ConfigError, apply_overrides, from_dict


@dataclass(frozen=True)
class Allocation:
    """Where the run executes: nodes, processes per node and the rendezvous endpoint."""

    nnodes: int
    nproc_per_node: int
    rdzv_endpoint: str
    rdzv_id: str

    @property
    def world_size(self) -> int:
        return self.nnodes * self.nproc_per_node

    @classmethod
    def from_env(
        cls, env: dict[str, str], nproc_per_node: int | None = None, nnodes: int | None = None
    ) -> Allocation:
        """From SLURM's variables when present, else a single local node; explicit arguments
        win."""
        if nproc_per_node is None:
            gpus = env.get("SLURM_GPUS_ON_NODE") or env.get("GPUS_PER_NODE")
            nproc_per_node = int(gpus) if gpus else _local_gpu_count() or 1
        if nnodes is None:
            nnodes = int(env.get("SLURM_NNODES", env.get("NNODES", "1")))
        host = env.get("MASTER_ADDR", "127.0.0.1")
        port = env.get("MASTER_PORT", "29500")
        return cls(
            nnodes=nnodes,
            nproc_per_node=nproc_per_node,
            rdzv_endpoint=f"{host}:{port}",
            rdzv_id=env.get("SLURM_JOB_ID", "local"),
        )


def _local_gpu_count() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except Exception:  # no torch or no driver: treat as no GPU
        return 0


def resolve_layout(
    tree: dict, alloc: Allocation
) -> tuple[dict[str, int], auto_layout.AutoLayout | None]:
    """The layout of the YAML's ``parallel`` section on the allocation (dp is what is left after
    tp×sp×pp), checked against the model and the row length by the trainer's own check; with
    ``parallel: auto`` also the plan that chose it. The optimizer section is checked too (the
    trainer checks everything again, paths included, on the nodes, before any process group
    starts)."""
    from_dict(OptimizerSection, tree.get("optimizer") or {}, "optimizer")
    model = from_dict(ModelSection, tree.get("model") or {}, "model")
    try:
        arch = model.build()
    except ModelConfigError as exc:
        raise ConfigError(f"model: {exc}") from None
    planned = None
    section = tree.get("parallel") or {}
    if section == AUTO_LAYOUT:
        planned = auto_layout.plan_layout(tree, arch, alloc.nnodes, alloc.nproc_per_node)
        section = planned.parallel
    parallel = from_dict(ParallelConfig, section, "parallel")
    data = tree.get("data") or {}
    seq_length = data.get("max_seq_length") if isinstance(data, dict) else None
    world = alloc.world_size
    return check_layout(parallel, arch, world, seq_length).layout(world), planned


def torchrun_command(
    config: str, overrides: list[str], alloc: Allocation, python: str = sys.executable
) -> list[str]:
    cmd = [python, "-m", "torch.distributed.run"]
    if alloc.nnodes == 1:
        cmd += ["--standalone"]
    else:
        cmd += [
            f"--nnodes={alloc.nnodes}",
            "--rdzv-backend=c10d",
            f"--rdzv-endpoint={alloc.rdzv_endpoint}",
            f"--rdzv-id={alloc.rdzv_id}",
        ]
    cmd += [f"--nproc-per-node={alloc.nproc_per_node}", "-m", "megatron_longvila.train"]
    return [*cmd, "--config", config, *overrides]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--nproc-per-node", type=int, default=None)
    parser.add_argument("--nnodes", type=int, default=None, help="default: SLURM_NNODES or 1")
    parser.add_argument("--dry-run", action="store_true", help="print the command and layout")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = parser.parse_args(argv)

    try:
        with open(args.config, encoding="utf-8") as handle:
            tree = yaml.safe_load(handle) or {}
        explicit_layout_wins(tree, args.overrides)
        apply_overrides(tree, args.overrides)
        alloc = Allocation.from_env(dict(os.environ), args.nproc_per_node, args.nnodes)
        resolved, planned = resolve_layout(tree, alloc)
    except (OSError, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    overrides = list(args.overrides)
    if planned is not None:
        print("\n".join(planned.describe()))
        overrides.append(auto_layout.as_override(planned.parallel))
    cmd = torchrun_command(args.config, overrides, alloc)
    summary = " ".join(f"{k}={v}" for k, v in resolved.items())
    print(f"# {alloc.nnodes} node(s) × {alloc.nproc_per_node} process(es): {summary}")
    print(shlex.join(cmd))
    if args.dry_run:
        return 0
    return subprocess.call(cmd)


if __name__ == "__main__":
    sys.exit(main())
