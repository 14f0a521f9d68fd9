"""JSON, markdown and PNG output of a measured comparison (:func:`compare.run_comparison`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

MB = 2**20


def _shape_line(result: dict[str, Any]) -> str:
    s, st = result["shape"], result["settings"]
    return (
        f"GPT decoder L={s['layers']} h={s['hidden']} heads={s['heads']} kv_heads={s['kv_heads']} "
        f"ffn={s['ffn_hidden']} vocab={s['vocab']}; batch {st['batch']} × {st['seq']} tokens, "
        f"{st['dtype']}; full training step (forward, loss, backward, gradient reduction); "
        f"median of {st['repeats']} steps × {result['rounds']} rounds (warm-up "
        f"{st['warmup']} per round dropped)"
    )


def measured_table(result: dict[str, Any]) -> str:
    layers = result["shape"]["layers"]
    lines = [
        "| strategy | tp×ulysses×ring | step (ms) | tokens/s | KB/rank/layer Ulysses | ring | TP "
        "| grad sync MB/rank | peak MB/rank (model) | load balance |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        b = r["bytes_by_group"]
        balance = "n/a" if r["load_balance"] is None else f"{r['load_balance']:.3f}"
        lines.append(
            f"| {r['strategy']} | {r['tp']}×{r['ulysses']}×{r['ring']} | "
            f"{1e3 * r['time_s']:.0f} | {r['tokens_per_s']:.0f} | "
            f"{b['ulysses'] / layers / 1024:.0f} | {b['ring'] / layers / 1024:.0f} | "
            f"{b['tp'] / layers / 1024:.0f} | {b['dp'] / MB:.2f} | {r['peak_bytes'] / MB:.1f} "
            f"({r['predicted_memory']['total'] / MB:.1f}) | {balance} |"
        )
    return "\n".join(lines)


def speedup_table(result: dict[str, Any]) -> str:
    calibrated = "calibration" in result
    header = "| strategy | vs | speedup measured | range over rounds |"
    rule = "|---|---|---:|---:|"
    if calibrated:
        header += " predicted | prediction − measured |"
        rule += "---:|---:|"
    lines = [header, rule]
    for e in result["speedups"]:
        low, high = min(e["measured_per_round"]), max(e["measured_per_round"])
        line = (
            f"| {e['strategy']} | {e['baseline']} | {e['measured']:.2f}× | {low:.2f}–{high:.2f}× |"
        )
        if calibrated:
            line += f" {e['predicted']:.2f}× | {100 * e['prediction_error']:+.0f}% |"
        lines.append(line)
    return "\n".join(lines)


def prediction_table(result: dict[str, Any]) -> str:
    lines = [
        "| strategy | measured (ms) | predicted (ms) | of which attention | ring exposed "
        "| Ulysses a2a | TP | grad sync |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        p = r["predicted_parts_s"]
        lines.append(
            f"| {r['strategy']} | {1e3 * r['time_s']:.0f} | {1e3 * r['predicted_s']:.0f} | "
            f"{1e3 * p['attention_compute']:.0f} | {1e3 * p['ring_exposed']:.0f} | "
            f"{1e3 * p['ulysses_all_to_all']:.0f} | {1e3 * p['tensor_parallel']:.0f} | "
            f"{1e3 * p['gradient_sync']:.0f} |"
        )
    return "\n".join(lines)


def fit_table(result: dict[str, Any]) -> str:
    """The calibrated model's errors beside the null model's (:func:`compare.fit_errors`)."""
    fit = result["fit"]
    lines = [
        "| prediction error | calibrated model: mean / max | null model: mean / max |",
        "|---|---:|---:|",
    ]
    for key, what in (("speedups", "speedups"), ("steps", "step times")):
        model, null = fit[key]["model"], fit[key]["null"]
        if model is None:
            continue
        lines.append(
            f"| {what} | {100 * model['mean_abs']:.0f}% / {100 * model['max_abs']:.0f}% | "
            f"{100 * null['mean_abs']:.0f}% / {100 * null['max_abs']:.0f}% |"
        )
    s = fit["speedups"]
    lines.append(f"| speedups on the measured side of 1× | {s['sign']} of {s['pairs']} | — |")
    return "\n".join(lines)


def markdown(result: dict[str, Any]) -> str:
    parts = [
        f"{_shape_line(result)}; {result['device']}; {result['date']}.",
        "",
        measured_table(result),
        "",
        speedup_table(result),
    ]
    if "calibration" in result:
        notes = "; ".join(result["cluster"]["notes"])
        parts += ["", f"Simulator calibrated on this machine: {notes}.", ""]
        parts += [prediction_table(result), "", fit_table(result)]
    return "\n".join(parts) + "\n"


def bar_chart(result: dict[str, Any], path: Path) -> None:
    """Step time per strategy, measured (and predicted) side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    labels = [r["strategy"] for r in rows]
    measured = [1e3 * r["time_s"] for r in rows]
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(rows)), 4))
    positions = range(len(rows))
    width = 0.4 if "calibration" in result else 0.6
    ax.bar([x - width / 2 for x in positions], measured, width, label="measured")
    if "calibration" in result:
        predicted = [1e3 * r["predicted_s"] for r in rows]
        ax.bar([x + width / 2 for x in positions], predicted, width, label="predicted")
    ax.set_xticks(list(positions), labels, rotation=20, ha="right")
    ax.set_ylabel("training step (ms)")
    ax.set_title(f"{result['settings']['seq']} tokens, {result['device']}", fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def save_json_and_markdown(out: Path, stem: str, data: dict[str, Any], text: str) -> None:
    """``out/<stem>.json`` (``data``) and ``out/<stem>.md`` (``text``); ``out`` is created."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(data, indent=2))
    (out / f"{stem}.md").write_text(text)


def write(result: dict[str, Any], out: Path, stem: str = "benchmark_sp") -> str:
    """Write ``<stem>.json``, ``<stem>.md`` and ``<stem>.png`` into ``out``; return the markdown."""
    text = markdown(result)
    save_json_and_markdown(out, stem, result, text)
    bar_chart(result, out / f"{stem}.png")
    return text
