"""Fit the simulator's rates to this machine (CPU, gloo) from small measurements.

Run on every rank of the world the benchmark uses, all ranks busy at once (so the rates include
the ranks' competition for cores, memory bandwidth and the loopback network):

* compute: the same GPT decoder without any parallelism, ``seq/world`` tokens on each rank
  (forward + backward), and the local attention kernel alone on a causal block of that size and
  a half block as ring steps run it. Attention rate = attention FLOPs / kernel time; "GEMM" rate
  = GEMM FLOPs / (model time − its attention time), so elementwise work rides on the GEMM rate as
  the simulator's efficiencies assume;
* link: ring exchanges (every rank sends to the next), all-to-alls and all-reduces over all ranks
  at two message sizes; latency and bandwidth are the least-squares fit (in relative error) of
  ``messages · latency + bytes / bandwidth`` to all of them;
* overlap: a matrix-multiply loop alone, a ring exchange alone and both at once:
  ``overlap = (t_compute + t_transfer − t_both) / min(t_compute, t_transfer)``, clipped to [0, 1].
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from functools import partial

import numpy as np
import torch
import torch.distributed as dist

from megatron_longvila.core.sequence_parallel import traffic
from megatron_longvila.planning import cost_model
from megatron_longvila.planning.simulator import Cluster, Link
from megatron_longvila.planning.workload import GPTShape, Strategy

REPEATS = 5


def _seconds(work: Callable[[], object], repeats: int = REPEATS) -> float:
    """Median over ``repeats`` (after one warm-up) of the slowest rank's time of ``work()``."""
    times = []
    for _ in range(repeats + 1):
        dist.barrier()
        start = time.perf_counter()
        work()
        elapsed = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
        times.append(float(elapsed))
    return statistics.median(times[1:])


def _attention_seconds(shape: GPTShape, tokens: int) -> tuple[float, int]:
    """(seconds, forward FLOPs) of the local kernel's forward + backward on a causal block of
    ``tokens`` and on the half block (``tokens/2`` queries) an off-diagonal ring step runs."""
    from megatron_longvila.core.sequence_parallel import kernels

    gen = torch.Generator().manual_seed(0)
    d, scale = shape.head_dim, shape.head_dim**-0.5
    q = torch.randn(1, tokens, shape.heads, d, generator=gen)
    k, v = (torch.randn(1, tokens, shape.kv_heads, d, generator=gen) for _ in range(2))

    def blocks():
        for queries, causal in ((q, True), (q[:, tokens // 2 :], False)):
            out, lse = kernels.block_forward(queries, k, v, scale=scale, causal=causal)
            kernels.block_backward(out, queries, k, v, out, lse, scale=scale, causal=causal)

    with kernels.counting_flops() as flops:
        blocks()
    return _seconds(blocks), flops.forward


def _model_seconds(shape: GPTShape, tokens: int) -> float:
    """Forward + backward of the whole decoder on ``tokens`` tokens, each rank on its own."""
    from megatron.core import parallel_state as mcore

    from megatron_longvila.benchmarks.gpt_step import StepSettings, build_gpt, local_batch
    from megatron_longvila.core.parallel_state import MMSPTopology, initialize_mmsp

    initialize_mmsp(MMSPTopology())
    try:
        settings = StepSettings(seq=tokens)
        model = build_gpt(shape, Strategy("ring-only"), settings)
        inputs, labels = local_batch(shape, settings, 1, 0, torch.device("cpu"))

        def step():
            model.zero_grad_buffer()
            model(inputs, None, None, labels=labels).sum().backward()  # no gradient reduction

        return _seconds(step)
    finally:
        mcore.destroy_model_parallel()


def _link_samples(world: int) -> list[tuple[float, float, float]]:
    """(messages, bytes sent per rank, seconds) of collectives over all ranks at two sizes."""
    from megatron_longvila.core.sequence_parallel import comm_stats

    group = dist.new_group(list(range(world)))
    samples = []
    for numel in (1 << 14, 1 << 20):
        x, nbytes = torch.randn(numel), numel * 4
        chunks = x.view(world, -1)
        exchange = partial(comm_stats.RingExchange, [x], group, "calibration", "p2p")
        samples.append((1, nbytes, _seconds(lambda e=exchange: e().wait())))
        all_to_all = partial(comm_stats.all_to_all, chunks, group, "calibration")
        samples.append((world - 1, traffic.all_to_all_bytes(nbytes, world), _seconds(all_to_all)))
        all_reduce = partial(comm_stats.all_reduce_sum, x.clone(), group, "calibration")
        samples.append(
            (2 * (world - 1), traffic.all_reduce_bytes(nbytes, world), _seconds(all_reduce))
        )
    return samples


def fit_link(samples: list[tuple[float, float, float]]) -> tuple[Link, float]:
    """Latency and bandwidth minimizing the relative error; also the largest relative error."""
    a = np.array([[m / s, b / s] for m, b, s in samples])
    latency, inverse_bandwidth = np.linalg.lstsq(a, np.ones(len(samples)), rcond=None)[0]
    latency, inverse_bandwidth = max(float(latency), 0.0), max(float(inverse_bandwidth), 1e-15)
    link = Link(bandwidth=1.0 / inverse_bandwidth, latency=latency)
    worst = max(abs(link.seconds(b, m) - s) / s for m, b, s in samples)
    return link, worst


def _overlap(world: int) -> dict[str, float]:
    from megatron_longvila.core.sequence_parallel import comm_stats

    group = dist.new_group(list(range(world)))
    a = torch.randn(256, 256)
    payload = torch.randn(1 << 20)

    def compute():
        for _ in range(20):
            a @ a

    def transfer():
        return comm_stats.RingExchange([payload], group, "calibration", "p2p")

    def both():
        exchange = transfer()
        compute()
        exchange.wait()

    t_compute = _seconds(compute)
    t_transfer = _seconds(lambda: transfer().wait())
    t_both = _seconds(both)
    hidden = (t_compute + t_transfer - t_both) / min(t_compute, t_transfer)
    return {
        "compute_s": t_compute,
        "transfer_s": t_transfer,
        "both_s": t_both,
        "overlap": min(1.0, max(0.0, hidden)),
    }


def measure_calibration(shape: GPTShape, seq: int) -> dict:
    """On every rank of the job: the measurements above for ``seq`` tokens over the world."""
    world = dist.get_world_size()
    tokens = seq // world
    attention_s, attention_forward = _attention_seconds(shape, tokens)
    model_s = _model_seconds(shape, tokens)
    local = Strategy("ring-only")
    gemm_flops = 3 * (
        shape.layers * cost_model.gemm_flops_per_layer(shape, local, 1, tokens)
        + cost_model.output_layer_flops(shape, local, 1, tokens)
    )
    # The model's attention is one causal block; the kernel measurement also ran a half block.
    causal_share = (tokens + 1) / (tokens + 1 + tokens // 2)
    model_attention_s = shape.layers * attention_s * causal_share
    samples = _link_samples(world)
    link, worst = fit_link(samples)
    return {
        "world": world,
        "tokens_per_rank": tokens,
        "attention_flops_per_s": (1 + cost_model.BACKWARD_ATTENTION_FLOPS)
        * attention_forward
        / attention_s,
        "gemm_flops_per_s": gemm_flops / max(model_s - model_attention_s, 1e-9),
        "model_s": model_s,
        "model_attention_s": model_attention_s,
        "link_samples": samples,
        "link_latency_s": link.latency,
        "link_bandwidth_bytes_per_s": link.bandwidth,
        "link_fit_worst_relative_error": worst,
        **_overlap(world),
    }


def calibrated_cluster(measured: dict) -> Cluster:
    """The simulator's cluster for this machine from :func:`measure_calibration`'s result."""
    link = Link(
        bandwidth=measured["link_bandwidth_bytes_per_s"], latency=measured["link_latency_s"]
    )
    gemm = measured["gemm_flops_per_s"]
    return Cluster(
        name=f"this CPU, {measured['world']} gloo ranks (calibrated)",
        gpus_per_node=measured["world"],
        peak_flops=gemm,
        gemm_efficiency=1.0,
        attention_efficiency=measured["attention_flops_per_s"] / gemm,
        intra_node=link,
        inter_node=link,
        overlap=measured["overlap"],
        memory_bytes=float("inf"),
        notes=(
            f"GEMM {gemm / 1e9:.2f} GFLOP/s and attention "
            f"{measured['attention_flops_per_s'] / 1e9:.2f} GFLOP/s per rank with all ranks busy",
            f"gloo link {link.bandwidth / 1e9:.3f} GB/s, {link.latency * 1e6:.0f} us per message "
            f"(worst fit error {100 * measured['link_fit_worst_relative_error']:.0f}%)",
            f"compute/communication overlap {measured['overlap']:.2f}",
        ),
    )
