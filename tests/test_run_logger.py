"""metrics.jsonl records every step once, also across a resume from an earlier checkpoint.

Reference: the list of steps a run resumed at step 4 (of 6 logged before a crash) must leave.
"""

from __future__ import annotations

import json

from megatron_longvila.training.run_logger import RunLogger


def _log(out, start: int, stop: int, resumed_at: int, tag: str) -> None:
    logger = RunLogger(out, total_steps=8, start_step=resumed_at, enabled=True, tensorboard=False)
    for step in range(start, stop + 1):
        logger.step(step, {"loss": float(step)}, {"run": tag})
    logger.close()


def test_a_resumed_run_replaces_the_steps_after_its_checkpoint(tmp_path):
    _log(tmp_path, 1, 6, resumed_at=0, tag="first")
    with (tmp_path / "metrics.jsonl").open("a") as handle:
        handle.write('{"step": 7, "loss": ')  # a line cut by the crash
    _log(tmp_path, 5, 8, resumed_at=4, tag="resumed")

    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 9))
    assert [r["run"] for r in records] == ["first"] * 4 + ["resumed"] * 4
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp file left


def test_a_fresh_run_keeps_nothing_of_an_old_file(tmp_path):
    _log(tmp_path, 1, 3, resumed_at=0, tag="old")
    _log(tmp_path, 1, 2, resumed_at=0, tag="new")
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["run"]) for r in records] == [(1, "new"), (2, "new")]
