"""megatron-longvila: long-video VLM training and serving with Multi-Modal Sequence Parallelism."""

from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent

setup(
    name="megatron-longvila",
    version="0.1.0",
    description=(
        "Megatron-core framework for long-context vision-language models on long videos, "
        "with Multi-Modal Sequence Parallelism (MM-SP)"
    ),
    long_description=(ROOT / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["megatron_longvila", "megatron_longvila.*"]),
    # Non-Python files ship through package_data alone (there is no MANIFEST.in): setuptools puts
    # them in both the sdist and the wheel. include_package_data would treat templates/ as an
    # undeclared package and warn that it may be dropped.
    package_data={"megatron_longvila.long_video_sft": ["templates/*.txt"]},
    install_requires=[
        # A range: GPU users bring their own CUDA build of torch; CPU installs pin the local wheel
        # first (see the Makefile) so that nothing here pulls a CUDA build.
        "torch>=2.4,<2.15",
        "megatron-core==0.16.1",
        # megatron-core builds hierarchical context-parallel groups (Ulysses × ring) with it.
        "einops",
        "megatron-energon==7.4.1",
        "numpy",
        "webdataset",
        "sentencepiece",
        "tokenizers",
        "av",
        "pillow",
        "pyyaml",
        "tqdm",
        "safetensors",
        "transformers",
        "tensorboard",
        "matplotlib",
        # Reads VideoMME's published questions (a parquet file) as they are.
        "pyarrow",
    ],
    extras_require={
        # apex is built from NVIDIA's source (github.com/NVIDIA/apex); the PyPI package named
        # "apex" is unrelated and is deliberately not listed.
        # The kernel adapters (core/sequence_parallel/gpu_kernels.py) follow the private entry
        # points as read in the sources of TE 2.8.0 through 2.20.2 (2.15 changed the layout and
        # dtype arguments) and of flash-attn 2.6.3, 2.7.0 and 2.8.3 (2.7 changed the window
        # arguments and return values); TE 2.20 accepts flash-attn < 2.8.4. Newer releases are
        # outside the ranges until they are read and `make gpu-check` passes on them.
        "gpu": ["transformer-engine[pytorch]>=2.8,<2.21", "flash-attn>=2.6.3,<2.9"],
        "test": ["pytest>=8", "ruff"],
        # Peers for tools/benchmark_sp.py --attention-only (the versions run beside ours; CPU:
        # DeepSpeed-Ulysses trains, yunchang's torch kernels run forward only).
        "peers": ["deepspeed==0.19.8", "yunchang==0.6.4"],
    },
    entry_points={
        "console_scripts": [
            "longvila-train=megatron_longvila.training.trainer:main",
            "longvila-launch=megatron_longvila.training.launcher:main",
            "longvila-generate=megatron_longvila.inference.generate:main",
            "longvila-eval=megatron_longvila.eval.cli:main",
            "longvila-convert=megatron_longvila.convert.cli:main",
            "longvila-build-sft=megatron_longvila.long_video_sft.cli:main",
        ],
    },
)
