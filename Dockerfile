# GPU image: NGC PyTorch (CUDA torch, apex, NCCL) + megatron-longvila with its [gpu] extra.
# Build:  docker build -t megatron-longvila .
# Run:    docker run --gpus all --ipc=host -v $PWD/runs:/workspace/runs megatron-longvila \
#             torchrun --nproc-per-node 8 examples/demo.py
# NGC PyTorch 26.01 (January 2026): the image Transformer Engine's README names from TE 2.13 on
# and megatron-core's install guide uses, three months newer than TE 2.8 (October 2025), the [gpu]
# extra's floor. The TE and flash-attn a tag ships are listed in its release notes (not checked
# here); `make gpu-check` prints the versions it finds.
ARG BASE_IMAGE=nvcr.io/nvidia/pytorch:26.01-py3
FROM ${BASE_IMAGE}

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    CUDA_DEVICE_MAX_CONNECTIONS=1

WORKDIR /workspace/megatron-longvila
COPY setup.py pyproject.toml README.md ./
COPY megatron_longvila ./megatron_longvila
# The base image's CUDA torch and Transformer Engine satisfy the ranges, so pip keeps them (the
# image's /etc/pip/constraint.txt pins them). flash-attn is published as source only: if the image
# lacks it, pip compiles it here (set MAX_JOBS to bound the build's memory).
RUN pip install -e '.[gpu]'
COPY tools ./tools
COPY examples ./examples
COPY tests ./tests

CMD ["bash"]
