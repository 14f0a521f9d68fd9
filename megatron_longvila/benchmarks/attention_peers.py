"""Attention alone, ours beside the peers: same inputs, same ranks, alternating rounds.

Entries: our Ulysses-only, ring-only (zigzag) and 2D attention (:func:`mmsp_attention`), and,
when installed (``pip install .[peers]``), DeepSpeed-Ulysses
(``deepspeed.sequence.layer.DistributedAttention`` around PyTorch's SDPA) and yunchang's USP
(``LongContextAttention`` with its ``TORCH_MATH`` kernels and basic ring; yunchang's
``TORCH_FLASH`` path calls an op with no CPU kernel).
Each timed pass is a forward and a backward where the implementation has a backward, a forward
only otherwise (yunchang's torch path on CPU), and is marked as such. Every rank draws the same
full q, k, v and output gradient; each implementation gets the shard its sequence split expects
(zigzag for ours, contiguous for the peers), and its output and gradients are compared with
float64 SDPA on the whole sequence.

Rounds alternate the order of the entries (odd rounds run backwards), so a drift of the
machine's load spreads over all of them.
"""

from __future__ import annotations

import importlib.util
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from megatron_longvila.core.parallel_state import MMSPGroups
from megatron_longvila.core.sequence_parallel.attention import mmsp_attention
from megatron_longvila.core.sequence_parallel.sharding import split_sequence


@dataclass(frozen=True)
class AttentionSettings:
    """q, k, v: [batch, seq, heads, head_dim] (as many kv heads as query heads, which every
    peer accepts); fp32 on CPU."""

    batch: int = 1
    seq: int = 4096
    heads: int = 8
    head_dim: int = 64
    causal: bool = True
    repeats: int = 3
    warmup: int = 1


@dataclass(frozen=True)
class Entry:
    """One implementation on a ``ulysses × ring`` split of the world."""

    name: str
    source: str  # "ours", "deepspeed", "yunchang"
    ulysses: int
    ring: int
    layout: str  # how the sequence is split over the ranks
    backward: bool

    @property
    def passes(self) -> str:
        return "forward + backward" if self.backward else "forward only"


def installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def entries_for(world: int) -> list[Entry]:
    """Our three strategies (every 2D split) and the installed peers on ``world`` ranks."""
    splits = [(u, world // u) for u in range(2, world) if world % u == 0]
    out = [
        Entry(f"ours Ulysses-only {world}", "ours", world, 1, "zigzag", True),
        Entry(f"ours ring-only {world}", "ours", 1, world, "zigzag", True),
    ]
    out += [Entry(f"ours 2D {u}×{r}", "ours", u, r, "zigzag", True) for u, r in splits]
    if installed("deepspeed"):
        out.append(Entry(f"DeepSpeed-Ulysses {world}", "deepspeed", world, 1, "contiguous", True))
    if installed("yunchang"):
        out += [
            Entry(f"yunchang USP {u}×{r}", "yunchang", u, r, "contiguous", False)
            for u, r in [(world, 1), *splits]
        ]
    return out


def _groups(ulysses: int, ring: int) -> MMSPGroups:
    """Our groups for a split of the whole world, Ulysses innermost (every rank makes all of
    them, in the same order; a rank pool drops them after each call)."""
    world, rank = dist.get_world_size(), dist.get_rank()
    mine = {}
    for level, members in (
        ("ulysses", [list(range(r * ulysses, (r + 1) * ulysses)) for r in range(ring)]),
        ("ring", [list(range(u, world, ulysses)) for u in range(ulysses)]),
    ):
        for ranks in members:
            group = dist.new_group(ranks)
            if rank in ranks and len(ranks) > 1:
                mine[level] = group
    return MMSPGroups(sp=dist.group.WORLD, **mine)


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
    """[b, s, h, d] attention by PyTorch's SDPA."""
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal
    )
    return out.transpose(1, 2)


def _attention(entry: Entry, settings: AttentionSettings) -> Callable[..., torch.Tensor]:
    """``fn(q, k, v) -> out`` on this rank's shards for ``entry``."""
    causal = settings.causal
    if entry.source == "ours":
        groups = _groups(entry.ulysses, entry.ring)
        return lambda q, k, v: mmsp_attention(q, k, v, causal=causal, groups=groups)
    if entry.source == "deepspeed":
        import deepspeed.comm
        from deepspeed.sequence.layer import DistributedAttention

        if not deepspeed.comm.is_initialized():  # wraps the process group already running
            deepspeed.comm.init_distributed("gloo", auto_mpi_discovery=False, verbose=False)
        layer = DistributedAttention(
            lambda q, k, v, *args, **kwargs: _sdpa(q, k, v, causal),
            dist.group.WORLD,
            scatter_idx=2,
            gather_idx=1,
        )
        return lambda q, k, v: layer(q, k, v, 0)  # batch_dim_idx 0: [b, s, h, d]
    from yunchang import LongContextAttention, set_seq_parallel_pg
    from yunchang.kernels import AttnType

    set_seq_parallel_pg(entry.ulysses, entry.ring, dist.get_rank(), dist.get_world_size())
    layer = LongContextAttention(ring_impl_type="basic", attn_type=AttnType.TORCH_MATH)
    return lambda q, k, v: layer(q, k, v, causal=causal)


def _inputs(settings: AttentionSettings) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    shape = (settings.batch, settings.seq, settings.heads, settings.head_dim)
    return [torch.randn(shape, generator=gen) for _ in range(4)]  # q, k, v, dout


def _slowest(seconds: float) -> float:
    t = torch.tensor([seconds], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def measure_entry(entry: Entry, settings: AttentionSettings, check: bool) -> dict[str, Any]:
    """On every rank: median seconds of ``repeats`` passes (slowest rank's), and with ``check``
    the largest absolute errors against float64 SDPA on the whole sequence."""
    world, rank = dist.get_world_size(), dist.get_rank()
    q, k, v, dout = _inputs(settings)

    def local(t: torch.Tensor) -> torch.Tensor:
        return split_sequence(t, world, rank, layout=entry.layout)

    fn = _attention(entry, settings)
    times = []
    for i in range(settings.warmup + settings.repeats):
        ql, kl, vl = (local(t).requires_grad_(entry.backward) for t in (q, k, v))
        dist.barrier()
        start = time.perf_counter()
        out = fn(ql, kl, vl)
        if entry.backward:
            out.backward(local(dout))
        elapsed = _slowest(time.perf_counter() - start)
        if i >= settings.warmup:
            times.append(elapsed)
    result: dict[str, Any] = {"times_s": times}
    if check:
        full = [t.double().requires_grad_() for t in (q, k, v)]
        reference = _sdpa(*full, settings.causal)
        reference.backward(dout.double())
        errors = {"out": (out.detach().double() - local(reference.detach())).abs().max().item()}
        if entry.backward:
            for name, mine, ref in zip(("dq", "dk", "dv"), (ql, kl, vl), full):
                errors[name] = (mine.grad.double() - local(ref.grad)).abs().max().item()
        worst = torch.tensor([max(errors.values())], dtype=torch.float64)
        dist.all_reduce(worst, op=dist.ReduceOp.MAX)
        result["max_abs_error"] = float(worst)
    return result


def run_attention_comparison(
    entries: list[Entry], settings: AttentionSettings, run_on_ranks, rounds: int = 2
) -> dict[str, Any]:
    """Every entry measured in ``rounds`` alternating rounds; medians, ranges and errors."""
    rows: dict[str, dict[str, Any]] = {}
    for round_index in range(rounds):
        order = entries if round_index % 2 == 0 else entries[::-1]
        for entry in order:
            result = run_on_ranks(measure_entry, entry, settings, round_index == 0)[0]
            fresh = asdict(entry) | {"passes": entry.passes, "round_medians_s": []}
            row = rows.setdefault(entry.name, fresh)
            row["round_medians_s"].append(statistics.median(result["times_s"]))
            if "max_abs_error" in result:
                row["max_abs_error"] = result["max_abs_error"]
    for row in rows.values():
        row["time_s"] = statistics.median(row["round_medians_s"])
    return {"settings": asdict(settings), "rounds": rounds, "rows": [rows[e.name] for e in entries]}


def attention_table(result: dict[str, Any]) -> str:
    lines = [
        "| implementation | ulysses×ring | split | timed pass | ms (median of rounds) | "
        "range over rounds | max abs error vs fp64 (out and grads) |",
        "|---|---:|---|---|---:|---:|---:|",
    ]
    for r in result["rows"]:
        low, high = min(r["round_medians_s"]), max(r["round_medians_s"])
        lines.append(
            f"| {r['name']} | {r['ulysses']}×{r['ring']} | {r['layout']} | {r['passes']} | "
            f"{1e3 * r['time_s']:.1f} | {1e3 * low:.1f}–{1e3 * high:.1f} | "
            f"{r.get('max_abs_error', float('nan')):.1e} |"
        )
    return "\n".join(lines)
