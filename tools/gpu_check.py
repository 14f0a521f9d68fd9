"""Check the attention kernels on a lent GPU and time them (``make gpu-check``).

Versions, every GPU backend × bf16/fp16 against the fp32 math kernel, packed rectangles, the
ring's block plan on one GPU, and monolithic vs ring throughput; JSON + markdown under ``--out``.
Without a GPU it prints the plan and exits 0.

    python tools/gpu_check.py --out runs/gpu_check
"""

from megatron_longvila.benchmarks.gpu_check import main

if __name__ == "__main__":
    raise SystemExit(main())
