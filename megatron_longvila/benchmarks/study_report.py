"""Markdown and PNG of the planner's study (:func:`scaling_study.paper_study`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from megatron_longvila.benchmarks.report import save_json_and_markdown
from megatron_longvila.planning.planner import FAMILIES

RATIOS = ("vs CP+TP", "vs ring-only")


def _tokens(n: int) -> str:
    if n == 0:
        return "—"
    if n >= 1 << 20 and n % (1 << 20) == 0:
        return f"{n >> 20}M"
    if n >= 1 << 20:
        return f"{n / (1 << 20):.2f}M"
    return f"{n >> 10}K"


def _plan_cell(plan: dict[str, Any] | None) -> str:
    if plan is None:
        return "OOM"
    s = plan["layout"]
    layout = "×".join(str(s[k]) for k in ("tp", "ulysses", "ring", "dp", "pp"))
    marks = ("R " if plan["recompute"] else "") + plan["sharding"]
    return f"{plan['step_s']:.2f} `{layout}` {marks}"


def _ratio_cell(cell: dict[str, Any], key: str) -> str:
    if key not in cell:
        return "—"
    decided = cell[f"{key} decided by"]
    return f"{cell[key]:.2f}× ({decided['term']} {decided['seconds']:+.2f} s)"


def speed_table(study: dict[str, Any]) -> str:
    lines = [
        "| GPUs | sequence | "
        + " | ".join(f"{f} (s)" for f in FAMILIES)
        + " | MM-SP runner-up (s) | MM-SP vs CP+TP | MM-SP vs ring-only |",
        "|---:|---:|" + "---|" * (len(FAMILIES) + 3),
    ]
    for cell in study["speed_grid"]:
        families = cell["families"]
        plans = [_plan_cell(families.get(f, [None])[0]) for f in FAMILIES]
        mmsp = families.get("MM-SP", [])
        runner_up = _plan_cell(mmsp[1]) if len(mmsp) > 1 else "—"
        ratios = [_ratio_cell(cell, k) for k in RATIOS]
        lines.append(
            f"| {cell['gpus']} | {_tokens(cell['seq'])} | "
            + " | ".join([*plans, runner_up, *ratios])
            + " |"
        )
    return "\n".join(lines)


def _range(r) -> str:
    return "—" if r is None else f"{r[0]:.2f}–{r[1]:.2f}×"


def ranges_table(study: dict[str, Any]) -> str:
    lines = [
        "| MM-SP speedup | paper | predicted here | over the sensitivity sweep |",
        "|---|---:|---:|---:|",
    ]
    for key, (low, high) in study["paper_ranges"].items():
        swept = [row["ranges"][key] for row in study["sensitivity"] if row["ranges"][key]]
        overall = (min(r[0] for r in swept), max(r[1] for r in swept)) if swept else None
        lines.append(
            f"| {key} | {low}–{high}× | {_range(study['predicted_ranges'][key])} | "
            f"{_range(overall)} |"
        )
    return "\n".join(lines)


def sensitivity_table(study: dict[str, Any]) -> str:
    lines = ["| parameter | value | MM-SP vs CP+TP | MM-SP vs ring-only |", "|---|---:|---:|---:|"]
    for row in study["sensitivity"]:
        scaled = row["parameter"] == "attention efficiency"
        value = f"{row['value']:g}" + ("× preset" if scaled else "")
        cells = [_range(row["ranges"][k]) for k in RATIOS]
        lines.append(f"| {row['parameter']} | {value} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def verdicts(study: dict[str, Any]) -> list[str]:
    """Where MM-SP wins and where it does not, grouped by baseline and deciding term."""
    out = []
    for key in RATIOS:
        groups: dict[tuple[bool, str], list[dict[str, Any]]] = {}
        for cell in study["speed_grid"]:
            if key in cell:
                decided = cell[f"{key} decided by"]
                groups.setdefault((decided["mmsp_wins"], decided["term"]), []).append(cell)
        for (wins, term), cells in sorted(groups.items(), key=lambda g: -len(g[1])):
            ratios = [c[key] for c in cells]
            where = ", ".join(f"{c['gpus']}/{_tokens(c['seq'])}" for c in cells)
            out.append(
                f"- MM-SP {'wins' if wins else 'loses'} {key} in {len(cells)} cell(s) "
                f"({min(ratios):.2f}–{max(ratios):.2f}×), decided by `{term}`: {where}"
            )
    return out


def memory_table(study: dict[str, Any]) -> str:
    lines = [
        "| model | GPUs | family | no recompute | layout | with recompute | layout |",
        "|---|---:|---|---:|---|---:|---|",
    ]
    for row in study["longest_sequences"]:
        cells = [row["model"], str(row["gpus"]), row["family"]]
        for key in ("recompute=False", "recompute=True"):
            plan = row[key]["plan"]
            layout = _plan_cell(plan).split(" ", 1)[1] if plan else "—"  # without the step time
            cells += [_tokens(row[key]["tokens"]), layout]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown(study: dict[str, Any]) -> str:
    s = study["shape"]
    model = (
        f"L={s['layers']} h={s['hidden']} heads={s['heads']} kv_heads={s['kv_heads']} "
        f"ffn={s['ffn_hidden']} vocab={s['vocab']}"
    )
    sections = [
        f"Cluster: {study['cluster']['name']}. Model: {model}.",
        "",
        "Assumptions:",
        *[f"- {a}" for a in study["assumptions"]],
        "",
        ranges_table(study),
        "",
        "Best plan of each family: predicted optimizer-step time (s), layout "
        "`tp×ulysses×ring×dp×pp`, optimizer sharding, R = full activation recomputation; "
        "OOM: no layout of the family fits. Ratios are seconds per token of the best CP+TP "
        "(ring-only) plan over the best MM-SP plan, with the part of the step that differs "
        "most in MM-SP's favour (against it where it loses), in seconds of the step.",
        "",
        speed_table(study),
        "",
        "Where MM-SP wins and where it does not:",
        "",
        *verdicts(study),
    ]
    if study["sensitivity"]:
        sections += ["", "Sensitivity (ranges over the grid):", "", sensitivity_table(study)]
    sections += [
        "",
        "Longest sequence that fits (one sequence per step) and the fastest layout at it:",
        "",
        memory_table(study),
    ]
    return "\n".join(sections) + "\n"


def ratio_chart(study: dict[str, Any], path: Path) -> None:
    """MM-SP's predicted speedups against sequence length, one line per GPU count."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key in zip(axes, RATIOS):
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
        ax.axhline(1.0, color="black", linewidth=0.5)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sequence (K tokens)")
        ax.set_ylabel(f"best MM-SP speedup {key} (best)")
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
