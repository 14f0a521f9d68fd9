"""Helper processes end with their parent when it is SIGKILLed (as a rank or a builder is).

Reference: the process tree itself. Each case starts a real parent (a one-rank trainer process
that saved a dist checkpoint; a dataset builder with a worker busy on a video), records its
descendants, kills the parent with SIGKILL and requires every descendant gone within seconds.
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GONE_WITHIN_S = 5.0

_SAVE_AND_WAIT = """
import os, sys, time, torch
from megatron.core.dist_checkpointing import ShardedTensor
from megatron_longvila.checkpoint.manager import CheckpointManager
from megatron_longvila.core import cpu_adaptations, platform
cpu_adaptations.adapt_megatron_for_cpu()
platform.init_single_process()
weights = ShardedTensor.from_rank_offsets("w", torch.arange(6.0))
CheckpointManager(sys.argv[1]).save(1, {"w": weights}, {})
print("saved", flush=True)
time.sleep(600)
"""

_BUILD = """
import pickle, sys
from megatron_longvila.long_video_sft.build import build_long_video_sft
build_long_video_sft(*pickle.load(open(sys.argv[1], "rb")))
"""


def _descendants(pid: int) -> set[int]:
    found, todo = set(), [pid]
    while todo:
        current = todo.pop()
        for children in Path(f"/proc/{current}/task").glob("*/children"):
            try:
                kids = {int(k) for k in children.read_text().split()}
            except OSError:
                continue
            todo += sorted(kids - found)
            found |= kids
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _kill_and_check(proc: subprocess.Popen) -> None:
    helpers = _descendants(proc.pid)
    assert helpers, "the parent started no helper process"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    deadline = time.monotonic() + GONE_WITHIN_S
    while any(_alive(p) for p in helpers) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = {p: Path(f"/proc/{p}/cmdline").read_bytes()[:120] for p in helpers if _alive(p)}
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert not left, f"helpers outlived their killed parent: {left}"


def _env() -> dict[str, str]:
    paths = [str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths), "OMP_NUM_THREADS": "1"}


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_checkpoint_writer_and_resource_tracker_exit_with_a_killed_rank(tmp_path):
    proc = subprocess.Popen(
        [sys.executable, "-c", _SAVE_AND_WAIT, str(tmp_path / "ckpt")],
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert proc.stdout.readline().strip() == "saved"
        assert (tmp_path / "ckpt" / "iter_0000001" / "train_state.json").is_file()
        _kill_and_check(proc)
    finally:
        proc.kill()


class SleepingCaptioner:
    """Announces its process id in ``$MLV_BUSY_FILE``, then works on the clip for ten minutes."""

    def caption(self, frames, prompt, max_new_tokens):
        Path(os.environ["MLV_BUSY_FILE"]).write_text(str(os.getpid()))
        time.sleep(600)
        return "never"


def sleeping_captioner(device, dtype):
    return SleepingCaptioner()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_builder_workers_exit_with_a_killed_builder(tmp_path):
    from test_long_video_sft import _scene_video, build_config

    _scene_video(tmp_path / "videos" / "v.mp4", (30,))
    config = dataclasses.replace(
        build_config(workers=1), captioner=f"py:{__name__}:sleeping_captioner"
    )
    args = (tmp_path / "videos", tmp_path / "out", tmp_path / "work", config)
    (tmp_path / "args.pkl").write_bytes(pickle.dumps(args))
    busy = tmp_path / "busy"
    proc = subprocess.Popen(
        [sys.executable, "-c", _BUILD, str(tmp_path / "args.pkl")],
        env={**_env(), "MLV_BUSY_FILE": str(busy)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 240
        while not busy.exists():
            assert proc.poll() is None, "the build ended before its worker got busy"
            assert time.monotonic() < deadline, "no worker started annotating"
            time.sleep(0.2)
        assert int(busy.read_text()) in _descendants(proc.pid)
        _kill_and_check(proc)
    finally:
        proc.kill()
