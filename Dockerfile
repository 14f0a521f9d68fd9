# GPU image: NGC PyTorch (CUDA torch, apex, NCCL) + megatron-longvila with its [gpu] extra.
# Build:  docker build -t megatron-longvila .
# Run:    docker run --gpus all --ipc=host -v $PWD/runs:/workspace/runs megatron-longvila \
#             torchrun --nproc-per-node 8 examples/demo.py
ARG BASE_IMAGE=nvcr.io/nvidia/pytorch:25.01-py3
FROM ${BASE_IMAGE}

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    CUDA_DEVICE_MAX_CONNECTIONS=1

WORKDIR /workspace/megatron-longvila
COPY setup.py pyproject.toml README.md ./
COPY megatron_longvila ./megatron_longvila
# The base image's CUDA torch satisfies the torch range; transformer-engine and flash-attn come
# with the image too, so the [gpu] extra installs nothing it already has.
RUN pip install -e '.[gpu]'
COPY tools ./tools
COPY examples ./examples
COPY tests ./tests

CMD ["bash"]
