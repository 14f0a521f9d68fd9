"""The benchmark and simulator tools run end to end and write what they promise.

Reference: the measured rows themselves — the speedup entries must be the ratios of the measured
(and predicted) step times they name, every strategy of the world must have a row, and the files
must be valid JSON, markdown with the tables, and PNG images. Tolerance: 1e-12 relative.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_longvila.benchmarks import report
from megatron_longvila.benchmarks.compare import run_comparison
from megatron_longvila.benchmarks.gpt_step import StepSettings
from megatron_longvila.planning.workload import GPTShape, strategies_for

ROOT = Path(__file__).resolve().parents[1]
PNG = b"\x89PNG\r\n\x1a\n"


def test_comparison_on_two_ranks_writes_json_markdown_and_chart(rank_pools, tmp_path):
    shape = GPTShape(layers=1, hidden=32, heads=4, kv_heads=2, ffn_hidden=48, vocab=64)
    strategies = strategies_for(2, shape)
    settings = StepSettings(seq=64, repeats=1, warmup=0)
    result = run_comparison(shape, strategies, settings, rank_pools(2).run, rounds=2)
    result |= {"device": "2 gloo ranks", "date": "test"}
    text = report.write(result, tmp_path)

    rows = {r["strategy"]: r for r in result["rows"]}
    assert list(rows) == [s.label for s in strategies] == ["ring-only 2", "ulysses-only 2"]
    assert all(len(r["times_s"]) == 2 for r in rows.values())  # one step per round
    (speedup,) = result["speedups"]
    ring, ulysses = rows["ring-only 2"], rows["ulysses-only 2"]
    per_round = [r / u for r, u in zip(ring["round_times_s"], ulysses["round_times_s"])]
    assert speedup["measured"] == pytest.approx(sum(per_round) / 2, rel=1e-12)  # median of two
    assert speedup["predicted"] == pytest.approx(
        ring["predicted_s"] / ulysses["predicted_s"], rel=1e-12
    )
    assert json.loads((tmp_path / "benchmark_sp.json").read_text())["speedups"] == [speedup]
    assert "| ulysses-only 2 | ring-only 2 |" in text
    assert (tmp_path / "benchmark_sp.png").read_bytes().startswith(PNG)


def test_simulate_tool_writes_the_study(tmp_path):
    subprocess.run(
        [sys.executable, str(ROOT / "tools/simulate_sp.py"), "--gpus", "32", "--seq", "128K",
         "--memory-gpus", "32", "--out", str(tmp_path)],
        check=True, capture_output=True, cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    study = json.loads((tmp_path / "simulate_sp.json").read_text())
    assert [c["seq"] for c in study["speed_grid"]] == [128 * 1024]
    text = (tmp_path / "simulate_sp.md").read_text()
    assert "| vs ring-only | 2.1–5.7× |" in text and "Assumptions:" in text
    assert (tmp_path / "simulate_sp.png").read_bytes().startswith(PNG)


def test_fit_errors_set_the_model_beside_a_null_model():
    """By hand: two strategies measured 1.0 s and 2.0 s, predicted 1.5 s and 2.0 s; the pair's
    measured speedup 0.5×, predicted 0.75×. The null model predicts 1× and 1.5 s for both."""
    from megatron_longvila.benchmarks.compare import fit_errors

    rows = [{"time_s": 1.0, "predicted_s": 1.5}, {"time_s": 2.0, "predicted_s": 2.0}]
    pairs = [{"measured": 0.5, "predicted": 0.75, "prediction_error": 0.75 / 0.5 - 1}]
    fit = fit_errors(rows, pairs)
    assert fit["speedups"]["model"]["mean_abs"] == pytest.approx(0.5, rel=1e-12)
    assert fit["speedups"]["null"]["mean_abs"] == pytest.approx(1.0, rel=1e-12)  # 1/0.5 − 1
    assert fit["speedups"]["sign"] == 1 and fit["speedups"]["pairs"] == 1
    assert fit["steps"]["model"]["mean_abs"] == pytest.approx(0.25, rel=1e-12)  # (0.5 + 0) / 2
    assert fit["steps"]["null"]["max_abs"] == pytest.approx(0.5, rel=1e-12)  # 1.5 / 1.0 − 1
    assert json.loads(json.dumps(fit)) == fit
