"""Search the parallel layouts of a training job and return the fastest that fits.

For a model (:class:`GPTShape`), a cluster (:class:`Cluster`), a GPU count and a workload
(sequence length and either the sequences of one optimizer step or the micro-batches each
data-parallel rank runs), every layout ``tp × ulysses × ring × dp × pp`` of a family is priced by
:func:`simulator.predict_step` with each optimizer sharding and with and without full activation
recomputation, and kept if it passes the constraints:

* heads: ``tp × ulysses`` divides the query heads, ``tp`` the key/value heads, whose share per
  tp rank is split over or replicated onto Ulysses (:meth:`Strategy.check`); ``tp`` divides the
  vocabulary and is one of :attr:`Search.tp_choices` (a caller narrows them for its own limits,
  e.g. the vision tower's heads);
* nodes: ``tp ≤ gpus_per_node`` (tensor parallelism stays on NVLink), ``pp`` divides the layers;
* sequence: ``seq`` is a multiple of ``2·sp`` (two zigzag chunks per rank); the step's sequences
  split evenly over ``dp``;
* memory: :func:`simulator.step_memory` (the cost model's formulas) within the GPU's usable
  memory.

Layouts are ranked by seconds per token of the optimizer step. Families: ``MM-SP`` (Ulysses ≥ 2,
any ring, optional TP), ``CP+TP`` (Megatron TP ≥ 2 + p2p ring), ``hier-CP`` (Megatron TP +
a2a + p2p, ring ≥ 2), ``ring-only`` and ``Ulysses-only`` (no TP). The model prices MM-SP with
TP and hier-CP alike where their layouts coincide: it does not tell the two implementations
apart.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, replace

from megatron_longvila.models.config import MemoryConfig
from megatron_longvila.planning import cost_model, simulator
from megatron_longvila.planning.cost_model import Precision, Training
from megatron_longvila.planning.simulator import Cluster
from megatron_longvila.planning.workload import GPTShape, Strategy

FAMILIES = ("MM-SP", "CP+TP", "hier-CP", "ring-only", "Ulysses-only")
GiB = 2**30
BF16 = Precision(activation=2, weight=2)  # bf16 activations and weights, fp32 gradients


class NoLayoutFits(ValueError):
    """No layout of the searched families runs the workload; the message names what is missing."""


@dataclass(frozen=True)
class Workload:
    """What one optimizer step trains: ``seq``-token sequences, ``batch`` per micro-batch, and
    either ``sequences_per_step`` in all (dp must divide them) or ``micro_batches`` per
    data-parallel rank (the step's sequences then grow with dp)."""

    shape: GPTShape
    seq: int
    sequences_per_step: int | None = None
    micro_batches: int | None = None
    batch: int = 1
    precision: Precision = BF16

    def __post_init__(self) -> None:
        if (self.sequences_per_step is None) == (self.micro_batches is None):
            raise ValueError("give exactly one of sequences_per_step and micro_batches")

    def micro_batches_at(self, dp: int) -> int | None:
        """Micro-batches per dp rank with ``dp`` ranks, or None when the step does not split."""
        if self.micro_batches is not None:
            return self.micro_batches
        if self.sequences_per_step % (dp * self.batch):
            return None
        return self.sequences_per_step // (dp * self.batch)


@dataclass(frozen=True)
class Search:
    """What may vary: tensor-parallel and pipeline sizes, optimizer shardings, recomputation;
    ``tp_sequence_parallel``: whether tp > 1 runs with Megatron's TP sequence parallelism;
    ``memory``: the model's memory options (what each layer keeps for the backward)."""

    families: tuple[str, ...] = FAMILIES
    tp_choices: tuple[int, ...] = (1, 2, 4, 8)
    pp_choices: tuple[int, ...] = (1, 2, 4)
    shardings: tuple[str, ...] = ("zero1", "zero3")
    recompute: tuple[bool, ...] = (False, True)
    tp_sequence_parallel: bool = True
    memory: MemoryConfig = cost_model.MODEL_MEMORY_OPTIONS


@dataclass(frozen=True)
class Plan:
    """One priced layout: seconds of the optimizer step by part, peak bytes per GPU by part."""

    family: str
    strategy: Strategy
    training: Training
    micro_batches: int
    tokens_per_step: int
    parts: dict[str, float]
    memory: dict[str, int]

    @property
    def seconds(self) -> float:
        return self.parts["total"]

    @property
    def seconds_per_token(self) -> float:
        return self.seconds / self.tokens_per_step

    @property
    def layout(self) -> tuple[int, int, int, int, int]:
        """``(tp, ulysses, ring, dp, pp)``: what two families' plans may share."""
        s = self.strategy
        return (s.tp, s.ulysses, s.ring, s.dp, s.pp)

    @property
    def label(self) -> str:
        extras = [self.training.sharding] + (["recompute"] if self.training.recompute else [])
        return f"{self.strategy.label} ({', '.join(extras)})"

    def as_dict(self) -> dict:
        s = self.strategy
        return {
            "family": self.family,
            "label": self.label,
            "layout": {"tp": s.tp, "ulysses": s.ulysses, "ring": s.ring, "dp": s.dp, "pp": s.pp},
            "sharding": self.training.sharding,
            "recompute": self.training.recompute,
            "micro_batches": self.micro_batches,
            "tokens_per_step": self.tokens_per_step,
            "step_s": self.seconds,
            "tokens_per_s": self.tokens_per_step / self.seconds,
            "parts_s": self.parts,
            "memory_bytes": self.memory,
        }


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def layouts(
    family: str, gpus: int, shape: GPTShape, cluster: Cluster, search: Search
) -> Iterator[Strategy]:
    """Every layout of ``family`` on ``gpus`` GPUs that splits ``shape`` (heads, layers, nodes)."""
    for tp in search.tp_choices:
        if tp > cluster.gpus_per_node or gpus % tp:
            continue
        for pp in search.pp_choices:
            if (gpus // tp) % pp or shape.layers % pp:
                continue
            for sp in _divisors(gpus // (tp * pp)):
                for ulysses in _divisors(sp):
                    strategy = _family_strategy(family, tp, ulysses, sp // ulysses, pp, gpus)
                    if strategy is None:
                        continue
                    try:
                        strategy.check(shape)
                    except ValueError:
                        continue
                    yield strategy


def _family_strategy(
    family: str, tp: int, ulysses: int, ring: int, pp: int, gpus: int
) -> Strategy | None:
    dp = gpus // (tp * ulysses * ring * pp)
    sizes = {"tp": tp, "ulysses": ulysses, "ring": ring, "dp": dp, "pp": pp}
    if family == "MM-SP" and ulysses >= 2:
        return Strategy("2D", **sizes)
    if family == "CP+TP" and tp >= 2 and ulysses == 1:
        return Strategy("CP+TP", **sizes)
    if family == "hier-CP" and ulysses >= 2 and ring >= 2:
        return Strategy("hier-CP", **sizes)
    if family == "ring-only" and tp == 1 and ulysses == 1 and ring >= 2:
        return Strategy("ring-only", **sizes)
    if family == "Ulysses-only" and tp == 1 and ring == 1 and ulysses >= 2:
        return Strategy("ulysses-only", **sizes)
    return None


def _trainings(strategy: Strategy, search: Search) -> Iterator[Training]:
    for sharding in search.shardings:
        for recompute in search.recompute:
            yield Training(
                sharding=sharding,
                recompute=recompute,
                tp_sequence_parallel=search.tp_sequence_parallel and strategy.tp > 1,
                overlap_grad_sync=True,
            )


def _fitting_plans(
    family: str, workload: Workload, cluster: Cluster, gpus: int, search: Search
) -> Iterator[Plan]:
    usable = cluster.memory_bytes * cluster.memory_usable
    for strategy in layouts(family, gpus, workload.shape, cluster, search):
        micro_batches = workload.micro_batches_at(strategy.dp)
        if micro_batches is None or workload.seq % (2 * strategy.sp):
            continue
        fits_without_recompute = set()  # shardings; recomputing those only costs time
        for training in _trainings(strategy, search):
            if training.recompute and training.sharding in fits_without_recompute:
                continue
            memory = _memory(workload, strategy, training, search)
            if memory["total"] > usable:
                continue
            if not training.recompute:
                fits_without_recompute.add(training.sharding)
            parts = simulator.predict_step(
                workload.shape,
                strategy,
                workload.batch,
                workload.seq,
                cluster,
                workload.precision,
                training,
                micro_batches,
            )
            tokens = strategy.dp * micro_batches * workload.batch * workload.seq
            yield Plan(family, strategy, training, micro_batches, tokens, parts, memory)


def _memory(
    workload: Workload, strategy: Strategy, training: Training, search: Search
) -> dict[str, int]:
    return simulator.step_memory(
        workload.shape,
        strategy,
        workload.batch,
        workload.seq,
        workload.precision,
        training,
        memory_options=search.memory,
    )


def best_per_family(
    workload: Workload, cluster: Cluster, gpus: int, search: Search = Search(), keep: int = 2
) -> dict[str, list[Plan]]:
    """The ``keep`` fastest plans (seconds per token) of each family; families with no fitting
    layout are left out."""
    found: dict[str, list[Plan]] = {}
    for plan in _ranked(workload, cluster, gpus, search):
        kept = found.setdefault(plan.family, [])
        if len(kept) < keep:
            kept.append(plan)
    return found


def choose(
    workload: Workload, cluster: Cluster, gpus: int, search: Search = Search()
) -> tuple[Plan, Plan | None]:
    """The fastest plan over all searched families and the runner-up (the fastest of a
    different layout); raises :class:`NoLayoutFits` naming the smallest missing resource."""
    plans = _ranked(workload, cluster, gpus, search)
    if not plans:
        raise NoLayoutFits(refusal(workload, cluster, gpus, search))
    runner_up = next((p for p in plans[1:] if p.layout != plans[0].layout), None)
    return plans[0], runner_up


def _ranked(workload: Workload, cluster: Cluster, gpus: int, search: Search) -> list[Plan]:
    """Every fitting plan of the searched families, fastest per token first."""
    plans = [
        p for f in search.families for p in _fitting_plans(f, workload, cluster, gpus, search)
    ]
    return sorted(plans, key=lambda p: p.seconds_per_token)


def refusal(workload: Workload, cluster: Cluster, gpus: int, search: Search) -> str:
    """Why nothing fits: no layout splits the workload at all, or the leanest needs more memory
    per GPU than there is (and how many GPUs would hold it)."""
    what = f"{workload.seq} tokens per sequence on {gpus} GPUs"
    leanest = None
    for family in search.families:
        for strategy in layouts(family, gpus, workload.shape, cluster, search):
            if workload.micro_batches_at(strategy.dp) is None:
                continue
            if workload.seq % (2 * strategy.sp):
                continue
            for training in _trainings(strategy, search):
                total = _memory(workload, strategy, training, search)["total"]
                if leanest is None or total < leanest[0]:
                    leanest = (total, strategy, training)
    if leanest is None:
        return (
            f"no layout of {', '.join(search.families)} splits {what}: the sequence must be a "
            "multiple of 2·sp, the step's sequences must split over dp, and tp×ulysses must "
            "divide the heads"
        )
    total, strategy, training = leanest
    usable = cluster.memory_bytes * cluster.memory_usable
    more = _gpus_that_fit(workload, cluster, gpus, search)
    hint = f"; {more} GPUs would hold it" if more else ""
    return (
        f"nothing fits {what}: the leanest layout ({strategy.label}, {training.sharding}"
        f"{', recompute' if training.recompute else ''}) needs {total / GiB:.1f} GiB per GPU, "
        f"{usable / GiB:.1f} GiB are usable — short of GPU memory by "
        f"{(total - usable) / GiB:.1f} GiB per GPU{hint}"
    )


def _gpus_that_fit(
    workload: Workload, cluster: Cluster, gpus: int, search: Search, doublings: int = 6
) -> int | None:
    """The smallest of ``2·gpus, 4·gpus, …`` on which some layout fits, if any."""
    for k in range(1, doublings + 1):
        more = gpus << k
        for family in search.families:
            if next(_fitting_plans(family, workload, cluster, more, search), None) is not None:
                return more
    return None


def longest_sequence(
    shape: GPTShape,
    cluster: Cluster,
    gpus: int,
    search: Search,
    precision: Precision = BF16,
    granularity: int = 1024,
    limit: int = 1 << 26,
) -> tuple[int, Plan | None]:
    """The longest sequence (a multiple of ``granularity``, one sequence per step) for which some
    layout of ``search`` fits on ``gpus`` GPUs, and the fastest plan at that length."""

    def fastest(seq: int) -> Plan | None:
        workload = Workload(shape, seq, sequences_per_step=1, precision=precision)
        plans = _ranked(workload, cluster, gpus, search)
        return plans[0] if plans else None

    # One sequence per step: dp = 1, every GPU holds a share of it, and each layout's memory
    # grows with the length, so "some layout fits" is monotone too. Every sp divides the unit.
    unit = math.lcm(2 * gpus, granularity)
    low, high = 0, limit // unit
    while low < high:
        mid = (low + high + 1) // 2
        if fastest(mid * unit) is not None:
            low = mid
        else:
            high = mid - 1
    return low * unit, fastest(low * unit) if low else None


def fit_length_table(
    shapes: dict[str, GPTShape],
    cluster: Cluster,
    gpu_counts: tuple[int, ...] = (128, 256),
    search: Search = Search(),
) -> list[dict]:
    """Longest sequence per model, GPU count and family, without and with full recomputation,
    and the layout that trains it (memory from :func:`simulator.step_memory`, i.e. the cost
    model's formulas, so the table follows them)."""
    rows = []
    for name, shape in shapes.items():
        for gpus in gpu_counts:
            for family in search.families:
                row: dict = {"model": name, "gpus": gpus, "family": family}
                for recompute in (False, True):
                    limited = replace(search, families=(family,), recompute=(recompute,))
                    length, plan = longest_sequence(shape, cluster, gpus, limited)
                    row[f"recompute={recompute}"] = {
                        "tokens": length,
                        "plan": plan.as_dict() if plan else None,
                    }
                rows.append(row)
    return rows
