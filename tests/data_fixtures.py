"""Small data made once per test process and shared by the data-pipeline tests."""

from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from pathlib import Path

from megatron_longvila.data.config import DataConfig


@functools.cache
def scratch_dir() -> Path:
    path = Path(tempfile.mkdtemp(prefix="mlv-data-tests-"))
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


@functools.cache
def tiny_tokenizer_dir() -> Path:
    """A byte-level BPE trained locally, saved as a Hugging Face tokenizer folder."""
    from megatron_longvila.data.synthetic import build_tiny_tokenizer

    return build_tiny_tokenizer(scratch_dir() / "tokenizer")


@functools.cache
def synthetic_shards() -> Path:
    """12 synthetic videos (mp4/mkv/webm/avi, 40 frames of 64×64) as 3+ prepared shards."""
    from megatron_longvila.data.synthetic import make_synthetic_shards

    report = make_synthetic_shards(
        scratch_dir() / "synthetic",
        num_videos=12,
        num_frames=40,
        containers=("mp4", "mkv", "webm", "avi"),
        max_shard_bytes=60_000,
    )
    assert len(report.shards) >= 3 and report.samples == 12 and not report.skipped
    return report.out_dir


SYNTHETIC_KEYS = [f"synthetic_{i:05d}" for i in range(12)]


def data_config(dataset_path: Path | str | None = None, **overrides) -> DataConfig:
    """Tiny shapes: 4 frames of 32×32, 4 tokens per frame, one epoch, no workers."""
    settings = dict(
        dataset_path=str(dataset_path or synthetic_shards()),
        tokenizer_path=str(tiny_tokenizer_dir()),
        num_frames=4,
        image_size=32,
        tokens_per_frame=4,
        max_seq_length=256,
        micro_batch_size=2,
        num_workers=0,
        repeat=False,
    )
    settings.update(overrides)
    return DataConfig(**settings)
