"""Cluster presets of the cost model: what one GPU computes and what its links carry, every
number with its source (printed with every prediction)."""

from __future__ import annotations

from megatron_longvila.planning.simulator import Cluster, Link

GiB = 2**30

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
    attention_half_tokens=256,
    gemm_half_width=128,
    ring_step_seconds=20e-6,
    notes=(
        "peak: 989 TFLOP/s dense bf16 (NVIDIA H100 SXM datasheet); large GEMMs at 55% of it and "
        "large-block flash attention at 40% (assumed, FlashAttention-2-class kernels; not "
        "measured here); elementwise work folded into these efficiencies",
        "attention efficiency falls for small blocks as q/(q + 256), q the query tokens of a "
        "ring step's block (assumed: half speed at 256 tokens, 80% at 1K, 94% at 4K, the shape "
        "of FlashAttention-2's published sequence-length sweeps); each ring step, forward or "
        "backward, costs a fixed 20 us more (assumed: kernel launches and the log-sum-exp merge)",
        "GEMM efficiency falls for narrow operands as w/(w + 128), w the smallest of a rank's "
        "tokens and its tensor-parallel share of the QKV, projection and MLP widths (assumed)",
        "NVLink 4: 350 GB/s per GPU per direction achievable (of 450 GB/s nominal), 5 us per "
        "message; InfiniBand NDR: 45 GB/s per GPU per direction achievable (of 50 GB/s line "
        "rate), 10 us per message (assumed from typical NCCL bus bandwidths)",
        "collectives are hierarchical: over g GPUs per node and m nodes a reduce-scatter or "
        "all-gather of S bytes costs max(S(g-1)/g / NVLink, S/g (m-1)/m / NIC) plus (g-1) NVLink "
        "and (m-1) NIC latencies, an all-reduce twice that; all-to-alls that leave a node send "
        "(N-g)/N of their bytes over each GPU's own NIC (NCCL's ring/tree over per-GPU NICs)",
        "90% of each overlappable transfer (ring K/V and dK/dV hops, gradient reduction, ZeRO-3 "
        "gathers) hides behind compute; Ulysses all-to-alls and TP collectives do not overlap "
        "(assumed; Megatron's defaults)",
        "90% of the 80 GiB usable for the step (CUDA context, allocator fragmentation, buffers)",
    ),
)
