"""Run every strategy on the same ranks, and set the calibrated simulator's predictions beside them.

:func:`run_comparison` takes a ``run_on_ranks(fn, *args) -> [result of each rank]`` (a
:class:`RankPool`'s ``run``, or, under torchrun, a call on this rank alone), so the same code runs
gloo processes on a CPU and one process per GPU. Strategies are measured in rounds (every strategy
once per round, steps timed within each; odd rounds in reverse order) so that a change in the
machine's load during the run spreads over all of them instead of falling on one.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

from megatron_longvila.benchmarks.calibration import calibrated_cluster, measure_calibration
from megatron_longvila.benchmarks.gpt_step import StepSettings, kernels_in_use, measure_strategy
from megatron_longvila.planning import cost_model, simulator
from megatron_longvila.planning.cost_model import Precision, Training
from megatron_longvila.planning.workload import GPTShape, Strategy

RunOnRanks = Callable[..., list[Any]]


def run_comparison(
    shape: GPTShape,
    strategies: list[Strategy],
    settings: StepSettings,
    run_on_ranks: RunOnRanks,
    rounds: int = 2,
    calibrate: bool = True,
) -> dict[str, Any]:
    """Measured rows (and, with ``calibrate``, predictions and ratios) for every strategy."""
    rows: dict[str, dict[str, Any]] = {}
    for round_index in range(rounds):
        # Odd rounds run backwards, so a steady drift of the machine's load cancels out.
        order = strategies if round_index % 2 == 0 else strategies[::-1]
        for strategy in order:
            result = run_on_ranks(measure_strategy, shape, strategy, settings, round_index == 0)[0]
            row = rows.setdefault(strategy.label, result | {"times_s": [], "round_times_s": []})
            row["times_s"] += result["times_s"]
            row["round_times_s"].append(statistics.median(result["times_s"]))
    for row in rows.values():
        row["time_s"] = statistics.median(row["times_s"])
        row["tokens_per_s"] = settings.batch * settings.seq / row["time_s"]
    precision = Precision.of(settings.dtype)
    for strategy in strategies:
        row = rows[strategy.label]
        row["predicted_bytes_by_group"] = cost_model.step_bytes_per_rank(
            shape, strategy, settings.batch, settings.seq, precision
        )
        row["predicted_memory"] = cost_model.memory_per_rank(
            shape,
            strategy,
            settings.batch,
            settings.seq,
            precision,
            optimizer_bytes_per_param=0,  # the step runs no optimizer
            kernels=kernels_in_use(),
            memory=cost_model.NO_MEMORY_OPTIONS,  # megatron's own GPTModel keeps everything
        )
    result: dict[str, Any] = {
        "shape": shape.as_dict(),
        "settings": asdict(settings),
        "rounds": rounds,
        "rows": [rows[s.label] for s in strategies],
    }
    if calibrate:
        measured = run_on_ranks(measure_calibration, shape, settings.seq)[0]
        cluster = calibrated_cluster(measured)
        for strategy, predicted in zip(strategies, predict(shape, strategies, settings, cluster)):
            rows[strategy.label]["predicted_s"] = predicted["total"]
            rows[strategy.label]["predicted_parts_s"] = predicted
        result["calibration"] = measured
        result["cluster"] = cluster.as_dict()
    result["speedups"] = speedups(strategies, rows)
    if calibrate:
        result["fit"] = fit_errors(result["rows"], result["speedups"])
    return result


def fit_errors(rows: list[dict[str, Any]], pairs: list[dict[str, Any]]) -> dict[str, Any]:
    """How far the calibrated predictions are from the measurements, beside a null model.

    The null model knows nothing of the strategies: it predicts every speedup 1× and every step
    the mean measured step. Errors are relative (``predicted / measured − 1``), as the mean and
    the largest absolute value; ``sign`` counts speedups predicted on the measured side of 1×.
    """

    def summary(errors: list[float]) -> dict[str, float]:
        absolute = [abs(e) for e in errors]
        return {"mean_abs": statistics.fmean(absolute), "max_abs": max(absolute)}

    mean_step = statistics.fmean(r["time_s"] for r in rows)
    return {
        "speedups": {
            "model": summary([p["prediction_error"] for p in pairs]) if pairs else None,
            "null": summary([1.0 / p["measured"] - 1 for p in pairs]) if pairs else None,
            "sign": sum(bool(p["predicted"] > 1) == bool(p["measured"] > 1) for p in pairs),
            "pairs": len(pairs),
        },
        "steps": {
            "model": summary([r["predicted_s"] / r["time_s"] - 1 for r in rows]),
            "null": summary([mean_step / r["time_s"] - 1 for r in rows]),
        },
    }


def predict(
    shape: GPTShape, strategies: list[Strategy], settings: StepSettings, cluster: simulator.Cluster
) -> list[dict[str, float]]:
    """The simulator's step of each strategy as the benchmark runs it (no sharding, no
    recomputation, gradient reduction after the backward)."""
    precision = Precision.of(settings.dtype)
    return [
        simulator.predict_step(
            shape, s, settings.batch, settings.seq, cluster, precision, Training()
        )
        for s in strategies
    ]


def comparison_pairs(strategies: list[Strategy]) -> list[tuple[Strategy, Strategy]]:
    """(strategy, baseline) pairs: every strategy against ring-only, and each 2D split
    ``U × R`` against CP+TP with ``tp = U``, ``cp = R`` (both keep ``U`` ranks of a sequence block
    inside a node and ring over ``R``)."""
    ring = next((s for s in strategies if s.kind == "ring-only"), None)
    pairs = [(s, ring) for s in strategies if ring is not None and s != ring]
    for s in strategies:
        if s.kind == "2D":
            pairs += [(s, o) for o in strategies if o.kind == "CP+TP" and o.tp == s.ulysses]
    return pairs


def speedups(strategies: list[Strategy], rows: dict[str, dict[str, Any]]) -> list[dict]:
    """Step-time ratios (baseline time / strategy time) measured and predicted, and how far the
    prediction is from the measurement (``predicted / measured − 1``).

    The measured ratio is paired: the median over rounds of the ratio within each round, whose
    two strategies ran minutes apart at most; the range over rounds shows the machine's noise.
    """
    out = []
    for strategy, baseline in comparison_pairs(strategies):
        row, base = rows[strategy.label], rows[baseline.label]
        per_round = [b / r for b, r in zip(base["round_times_s"], row["round_times_s"])]
        entry = {
            "strategy": strategy.label,
            "baseline": baseline.label,
            "measured": statistics.median(per_round),
            "measured_per_round": per_round,
        }
        if "predicted_s" in row:
            entry["predicted"] = base["predicted_s"] / row["predicted_s"]
            entry["prediction_error"] = entry["predicted"] / entry["measured"] - 1
        out.append(entry)
    return out
