"""Markdown and PNG of the simulator's study (:func:`scaling_study.paper_study`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from megatron_longvila.benchmarks.report import save_json_and_markdown

STRATEGIES = ("MM-SP 2D", "ring-only", "Ulysses-only", "CP+TP")


def _tokens(n: int) -> str:
    if n == 0:
        return "—"
    if n >= 1 << 20 and n % (1 << 20) == 0:
        return f"{n >> 20}M"
    if n >= 1 << 20:
        return f"{n / (1 << 20):.2f}M"
    return f"{n >> 10}K"


def _step_cell(step: dict[str, Any] | None) -> str:
    if step is None:
        return "OOM"
    return f"{step['seconds']:.2f}" + (" (R)" if step["recompute"] else "")


def speed_table(study: dict[str, Any]) -> str:
    lines = [
        "| GPUs | sequence | "
        + " | ".join(f"{s} (s)" for s in STRATEGIES)
        + " | MM-SP vs ring-only | MM-SP vs CP+TP |",
        "|---:|---:|" + "---:|" * (len(STRATEGIES) + 2),
    ]
    for cell in study["speed_grid"]:
        steps = [_step_cell(cell["steps"][s]) if s in cell["steps"] else "n/a" for s in STRATEGIES]
        ratios = [f"{cell[k]:.2f}×" if k in cell else "—" for k in ("vs ring-only", "vs CP+TP")]
        lines.append(
            f"| {cell['gpus']} | {_tokens(cell['seq'])} | " + " | ".join(steps + ratios) + " |"
        )
    return "\n".join(lines)


def memory_table(study: dict[str, Any]) -> str:
    lines = [
        "| GPUs | " + " | ".join(f"{s} no recompute / recompute" for s in STRATEGIES) + " |",
        "|---:|" + "---:|" * len(STRATEGIES),
    ]
    for row in study["longest_sequences"]:
        cells = []
        for s in STRATEGIES:
            if s not in row:
                cells.append("n/a")
                continue
            r = row[s]
            cells.append(f"{_tokens(r['recompute=False'])} / {_tokens(r['recompute=True'])}")
        lines.append(f"| {row['gpus']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def ranges_table(study: dict[str, Any]) -> str:
    lines = ["| MM-SP speedup | paper | predicted here |", "|---|---:|---:|"]
    for key, (low, high) in study["paper_ranges"].items():
        predicted = study["predicted_ranges"][key]
        shown = "—" if predicted is None else f"{predicted[0]:.2f}–{predicted[1]:.2f}×"
        lines.append(f"| {key} | {low}–{high}× | {shown} |")
    return "\n".join(lines)


def markdown(study: dict[str, Any]) -> str:
    s = study["shape"]
    model = (
        f"L={s['layers']} h={s['hidden']} heads={s['heads']} kv_heads={s['kv_heads']} "
        f"ffn={s['ffn_hidden']} vocab={s['vocab']}"
    )
    return (
        "\n".join(
            [
                f"Cluster: {study['cluster']['name']}. Model: {model}.",
                "",
                "Assumptions:",
                *[f"- {a}" for a in study["assumptions"]],
                "",
                ranges_table(study),
                "",
                "Predicted step time (s); (R): fits only with full activation recomputation; "
                "OOM: does not fit; n/a: the strategy cannot split this model on so many GPUs.",
                "",
                speed_table(study),
                "",
                "Longest sequence that fits (batch 1), without / with full activation "
                "recomputation:",
                "",
                memory_table(study),
            ]
        )
        + "\n"
    )


def ratio_chart(study: dict[str, Any], path: Path) -> None:
    """MM-SP's predicted speedups against sequence length, one line per GPU count."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key in zip(axes, ("vs ring-only", "vs CP+TP")):
        for gpus in sorted({c["gpus"] for c in study["speed_grid"]}):
            cells = [c for c in study["speed_grid"] if c["gpus"] == gpus and key in c]
            ax.plot(
                [c["seq"] / 1024 for c in cells],
                [c[key] for c in cells],
                "o-",
                label=f"{gpus} GPUs",
            )
        low, high = study["paper_ranges"][key]
        ax.axhspan(low, high, color="grey", alpha=0.2, label="paper's range")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sequence (K tokens)")
        ax.set_ylabel(f"MM-SP speedup {key}")
        ax.legend(fontsize=8)
    fig.suptitle(study["cluster"]["name"], fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write(study: dict[str, Any], out: Path, stem: str = "simulate_sp") -> str:
    """Write ``<stem>.json``, ``<stem>.md`` and ``<stem>.png`` into ``out``; return the markdown."""
    text = markdown(study)
    save_json_and_markdown(out, stem, study, text)
    ratio_chart(study, out / f"{stem}.png")
    return text
