"""The trainer end to end under torchrun (4 CPU ranks): crash and resume, resharding, bad configs.

References: an uninterrupted run of the same config (weights ≤1e-6, same samples in the same
order), and the same next batch evaluated in the saving layout (loss ≤1e-5).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from megatron_longvila.checkpoint.manager import CheckpointManager
from megatron_longvila.checkpoint.tensors import load_full_tensors
from megatron_longvila.core.sequence_parallel.visual_exchange import frames_per_rank

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 900


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    from megatron_longvila.data.synthetic import build_tiny_tokenizer, make_synthetic_shards

    root = tmp_path_factory.mktemp("trainer-data")
    build_tiny_tokenizer(root / "tokenizer", vocab_size=400)
    make_synthetic_shards(root / "data", num_videos=12, num_frames=16, width=48, height=48)
    return root


def _write_config(tiny_data: Path, out: Path, **parallel) -> Path:
    sizes = {"tp": 1, "ulysses": 2, "ring": 1, **parallel}
    config = {
        "run": {"output_dir": str(out), "train_steps": 8, "save_interval": 2, "keep_last": 3},
        "parallel": sizes,
        "model": {"preset": "tiny", "overrides": {"llm": {"vocab_size": 448}}},
        "data": {
            "dataset_path": str(tiny_data / "data" / "shards"),
            "tokenizer_path": str(tiny_data / "tokenizer"),
            "max_seq_length": 256,
            "num_frames": 4,
            "num_workers": 1,
        },
        "optimizer": {"lr": 2.0e-3, "warmup_steps": 1},
    }
    path = out.with_suffix(".yaml")
    path.write_text(json.dumps(config))  # JSON is YAML
    return path


def _torchrun(config: Path, *overrides: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=4"]
    cmd += ["-m", "megatron_longvila.train", "--config", str(config), *overrides]
    return subprocess.Popen(
        cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def _finish(proc: subprocess.Popen) -> str:
    out, _ = proc.communicate(timeout=TIMEOUT_S)
    assert proc.returncode == 0, out[-4000:]
    return out


def _steps(out: Path) -> dict[int, dict]:
    """The record of every step, which appears once and in order (a resumed run first cuts the
    steps after its checkpoint)."""
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [record["step"] for record in records]
    assert steps == list(range(steps[0], steps[0] + len(steps))), steps
    return {record["step"]: record for record in records}


def _rank_pid(torchrun_pid: int, rank: int) -> int | None:
    for child in Path(f"/proc/{torchrun_pid}/task").glob("*/children"):
        for pid in child.read_text().split():
            environ = Path(f"/proc/{pid}/environ")
            try:
                if f"RANK={rank}".encode() in environ.read_bytes().split(b"\0"):
                    return int(pid)
            except OSError:
                continue
    return None


def _final_weights(out: Path) -> dict[str, torch.Tensor]:
    latest = CheckpointManager(out / "checkpoints").latest_dir()
    return load_full_tensors(latest, "llm.") | load_full_tensors(latest, "mm_projector.")


def test_killed_rank_resumes_to_the_uninterrupted_result(tiny_data, tmp_path):
    clean = tmp_path / "clean"
    _finish(_torchrun(_write_config(tiny_data, clean)))

    crashed = tmp_path / "crashed"
    config = _write_config(tiny_data, crashed)
    proc = _torchrun(config)
    # Kill rank 1 the moment the checkpoint after step 4 starts being written.
    partial = crashed / "checkpoints" / "iter_0000006.partial"
    deadline = time.monotonic() + TIMEOUT_S
    while not partial.exists():
        assert proc.poll() is None, proc.communicate()[0][-4000:]
        assert time.monotonic() < deadline, "the run never reached step 6's checkpoint"
        time.sleep(0.02)
    pid = _rank_pid(proc.pid, 1)
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    proc.communicate(timeout=TIMEOUT_S)
    assert proc.returncode != 0

    manager = CheckpointManager(crashed / "checkpoints")
    assert manager.latest_dir().name == "iter_0000004", "a checkpoint cut by the kill is latest"
    _finish(_torchrun(config))

    clean_steps, crashed_steps = _steps(clean), _steps(crashed)
    assert sorted(crashed_steps) == list(range(1, 9))
    for step in range(1, 9):
        assert crashed_steps[step]["samples"] == clean_steps[step]["samples"], step
    expected, got = _final_weights(clean), _final_weights(crashed)
    assert expected.keys() == got.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], atol=1e-6, rtol=0, msg=key)
    assert clean_steps[8]["loss"] < clean_steps[1]["loss"]


def test_resume_in_another_layout_gives_the_same_next_loss(tiny_data, tmp_path):
    saved = tmp_path / "tp1_sp4"
    config = _write_config(tiny_data, saved, tp=1, ulysses=2, ring=2)
    _finish(_torchrun(config, "run.train_steps=2"))
    resharded = tmp_path / "tp2_sp2"
    shutil.copytree(saved / "checkpoints", resharded / "checkpoints")
    # Continue the same checkpoint in both layouts for one more step (the same batch).
    _finish(_torchrun(config, "run.train_steps=3", "run.save_interval=100"))
    other = _write_config(tiny_data, resharded, tp=2, ulysses=2, ring=1)
    _finish(_torchrun(other, "run.train_steps=3", "run.save_interval=100"))
    same, moved = _steps(saved)[3], _steps(resharded)[3]
    assert moved["samples"] == same["samples"]
    assert moved["loss"] == pytest.approx(same["loss"], abs=1e-5)
    # Stage 1 as the models counted it: at sp 4 every rank encoded its quarter of the frames;
    # at tp 2 × sp 2 both tensor-parallel ranks of an sp rank encoded that rank's half.
    for record in _steps(saved).values():
        assert record["frames_by_rank"] == frames_per_rank(sum(record["media_frames"]), 4)
    halves = frames_per_rank(sum(moved["media_frames"]), 2)
    assert moved["frames_by_rank"] == [halves[0], halves[0], halves[1], halves[1]]
    # Another dp size on the same world is refused before any process group or load.
    out = _trainer_main(config, "parallel.ulysses=1", "parallel.ring=2", "run.train_steps=4")
    assert out.returncode == 2, out.stderr[-2000:]
    assert "written by 4 ranks with dp=1, this run has 4 ranks with dp=2" in out.stderr


def _trainer_main(config: Path, *overrides: str) -> subprocess.CompletedProcess:
    """The trainer's entry point as torchrun's 4 ranks would start it, up to its config check."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WORLD_SIZE": "4"}
    return subprocess.run(
        [sys.executable, "-m", "megatron_longvila.train", "--config", str(config), *overrides],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_bad_config_stops_before_any_process_group(tiny_data, tmp_path):
    config = _write_config(tiny_data, tmp_path / "bad")
    cases = {
        "parallel.ring=3": "world size 4 is not divisible",
        "data.dataset_path=/nowhere": "data.dataset_path: /nowhere does not exist",
        "optimizer.learning_rate=1": "unknown config key 'optimizer.learning_rate'",
        "optimizer.adam_beta2=1.5": "adam_beta2 must be in [0, 1)",
        f"init.checkpoint={tiny_data}": "holds no checkpoint",
    }
    for override, message in cases.items():
        out = _trainer_main(config, override)
        assert out.returncode == 2 and message in out.stderr, (override, out.stderr[-2000:])
