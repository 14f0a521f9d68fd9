"""What each memory option saves, measured on this machine beside the cost model's prediction,
and what the checked formulas say about 2M-token training (``tools/measure_memory.py --options``).

* Saved bytes per token of one LLM layer (fp32, one rank, the device's layer spec) at three shapes
  with every option off, each option alone, and the model's defaults.
* The loss path's peak (output layer + cross entropy, forward + backward) at three (tokens,
  vocabulary) shapes, on all logits and in chunks.
* From the formulas at full size (bf16, Transformer Engine kernels): the loss peak of an 8B model
  at 16k tokens per rank, and the longest sequence one step fits on 128 and 256 H100s without
  layer recomputation, for the Llama-3-8B and Qwen2-7B presets.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from megatron_longvila.benchmarks.report import save_json_and_markdown
from megatron_longvila.planning import cost_model
from megatron_longvila.planning.workload import LLAMA3_8B, QWEN2_7B, GPTShape, Strategy

PLAIN = cost_model.NO_MEMORY_OPTIONS
SETTINGS = {
    "none": PLAIN,
    "recompute_activation": replace(PLAIN, recompute_activation=True),
    "norm_keeps_input": replace(PLAIN, norm_keeps_input=True),
    "defaults": cost_model.MODEL_MEMORY_OPTIONS,
}
LAYER_SHAPES = [  # (shape, tokens)
    (GPTShape(layers=1, hidden=512, heads=8, kv_heads=2, ffn_hidden=1408, vocab=512), 1024),
    (GPTShape(layers=1, hidden=256, heads=8, kv_heads=4, ffn_hidden=704, vocab=512), 2048),
    (GPTShape(layers=1, hidden=384, heads=6, kv_heads=2, ffn_hidden=1024, vocab=512), 1536),
]
LOSS_SHAPES = [(1024, 32000, 256), (2048, 128256, 1024), (4096, 16384, 512)]  # tokens, V, chunk
FP32 = cost_model.Precision.of("float32")


def measure(progress=None) -> dict[str, Any]:
    """Run the measurements on this process (one rank, parallel state initialized here)."""
    from megatron.core import parallel_state

    from megatron_longvila.benchmarks.layer_memory import loss_peak_bytes, saved_bytes_per_layer

    parallel_state.initialize_model_parallel()
    try:
        layers = []
        for shape, tokens in LAYER_SHAPES:
            for name, memory in SETTINGS.items():
                predicted = cost_model.layer_activation_bytes(
                    shape,
                    Strategy("2D"),
                    1,
                    tokens,
                    FP32,
                    kernels=cost_model.TORCH_KERNELS,
                    memory=memory,
                )
                measured = saved_bytes_per_layer(shape, tokens, memory)
                layers.append(
                    {
                        "shape": shape.as_dict(),
                        "tokens": tokens,
                        "option": name,
                        "measured_bytes_per_token": measured / tokens,
                        "predicted_bytes_per_token": predicted / tokens,
                    }
                )
                if progress:
                    progress()
        losses = []
        for tokens, vocab, chunk in LOSS_SHAPES:
            shape = GPTShape(1, 64, 4, 2, 128, vocab)
            for chunk_tokens in (None, chunk):
                losses.append(
                    {
                        "tokens": tokens,
                        "vocab": vocab,
                        "chunk": chunk_tokens,
                        "measured_bytes": loss_peak_bytes(shape, tokens, chunk_tokens),
                        "predicted_bytes": cost_model.loss_peak_bytes(
                            tokens, vocab, 64, FP32, chunk_tokens, into_main_grad=False
                        ),
                    }
                )
                if progress:
                    progress()
        return {"layers": layers, "loss": losses}
    finally:
        parallel_state.destroy_model_parallel()


def at_scale() -> dict[str, Any]:
    """What the checked formulas predict at full size (bf16, Transformer Engine kernels)."""
    from megatron_longvila.planning import planner
    from megatron_longvila.planning.clusters import H100_NODES

    bf16 = cost_model.Precision()
    tokens, chunk = 16384, cost_model.MODEL_MEMORY_OPTIONS.loss_chunk_tokens
    whole = cost_model.loss_peak_bytes(tokens, LLAMA3_8B.vocab, LLAMA3_8B.hidden, bf16, None)
    chunked = cost_model.loss_peak_bytes(tokens, LLAMA3_8B.vocab, LLAMA3_8B.hidden, bf16, chunk)
    weight_grad = LLAMA3_8B.vocab * LLAMA3_8B.hidden * bf16.activation  # both paths make one
    fits = []
    for preset, shape in (("llama3-8b", LLAMA3_8B), ("qwen2-7b", QWEN2_7B)):
        for gpus in (128, 256):
            for name in ("none", "defaults"):
                for sharding in ("zero1", "zero3"):
                    search = planner.Search(
                        shardings=(sharding,), recompute=(False,), memory=SETTINGS[name]
                    )
                    seq, plan = planner.longest_sequence(shape, H100_NODES, gpus, search)
                    fits.append(
                        {
                            "preset": preset,
                            "gpus": gpus,
                            "options": name,
                            "sharding": sharding,
                            "seq": seq,
                            "plan": plan.as_dict() if plan else None,
                        }
                    )
    return {
        "loss_8b_16k": {
            "tokens": tokens,
            "vocab": LLAMA3_8B.vocab,
            "chunk": chunk,
            "whole_bytes": whole,
            "chunked_bytes": chunked,
            "weight_grad_bytes": weight_grad,
            "ratio": whole / chunked,
            "ratio_beside_weight_grad": (whole - weight_grad) / (chunked - weight_grad),
        },
        "fit": fits,
        "assumptions": [
            f"the planner's cluster: {H100_NODES.name}, {H100_NODES.memory_usable:.0%} of "
            "memory usable",
            "one sequence per step (dp = 1); the fastest layout of any family at the longest "
            "length; bf16 weights and activations, fp32 gradients and Adam (12 B/param)",
            "LLM only (the vision tower's activations are not counted), no layer recomputation",
            "Transformer Engine kernels (fused norm+linear and SwiGLU; RoPE unfused, its angles "
            "being per token): read from TE's source, not measured here; the CPU kernels' "
            "formulas are the measured ones",
        ],
    }


def _layout(plan: dict | None) -> str:
    if plan is None:
        return "—"
    layout = plan["layout"]
    return (
        f"{plan['family']} tp {layout['tp']} × ulysses {layout['ulysses']} × ring "
        f"{layout['ring']} × pp {layout['pp']}"
    )


def _mb(value: float) -> str:
    return f"{value / 2**20:.2f}"


def markdown(result: dict[str, Any]) -> str:
    lines = [
        "Saved bytes per token of one LLM layer (fp32, CPU, local spec), measured and predicted "
        "by `cost_model.layer_activation_bytes`; ratio = vs all options off.",
        "",
        "| hidden / heads:kv / ffn | tokens | option | measured B/token | predicted | error | "
        "ratio |",
        "|---|---:|---|---:|---:|---:|---:|",
    ]
    base: dict[tuple, float] = {}
    for row in result["layers"]:
        s = row["shape"]
        key = (s["hidden"], s["heads"], s["ffn_hidden"])
        measured, predicted = row["measured_bytes_per_token"], row["predicted_bytes_per_token"]
        base.setdefault(key, measured)
        lines.append(
            f"| {s['hidden']} / {s['heads']}:{s['kv_heads']} / {s['ffn_hidden']} | "
            f"{row['tokens']} | {row['option']} | {measured:.0f} | {predicted:.0f} | "
            f"{(measured - predicted) / predicted:+.2%} | {measured / base[key]:.3f} |"
        )
    lines += [
        "",
        "Loss path peak (output layer + cross entropy, forward + backward, fp32, hidden 64), MB:",
        "",
        "| tokens | vocab | chunk | measured MB | predicted MB | error |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for row in result["loss"]:
        m, p = row["measured_bytes"], row["predicted_bytes"]
        lines.append(
            f"| {row['tokens']} | {row['vocab']} | {row['chunk'] or 'whole'} | {_mb(m)} | "
            f"{_mb(p)} | {(m - p) / p:+.2%} |"
        )
    scale = result["at_scale"]
    loss = scale["loss_8b_16k"]
    lines += [
        "",
        f"From the formulas, Llama-3-8B output layer at {loss['tokens']} tokens per rank, bf16, "
        f"tp 1: loss peak {loss['whole_bytes'] / 2**30:.2f} GiB on whole logits, "
        f"{loss['chunked_bytes'] / 2**30:.2f} GiB in chunks of {loss['chunk']} "
        f"({loss['ratio']:.1f}×; {loss['ratio_beside_weight_grad']:.1f}× beside the "
        f"{loss['weight_grad_bytes'] / 2**30:.2f} GiB weight gradient both make).",
        "",
        "Longest sequence of one step without layer recomputation (checked formulas):",
        "",
        "| preset | GPUs | memory options | sharding | longest sequence | layout |",
        "|---|---:|---|---|---:|---|",
    ]
    for row in scale["fit"]:
        lines.append(
            f"| {row['preset']} | {row['gpus']} | {row['options']} | {row['sharding']} | "
            f"{row['seq'] / 2**20:.2f}M | {_layout(row['plan'])} |"
        )
    lines += ["", "Assumptions: " + "; ".join(scale["assumptions"]) + "."]
    return "\n".join(lines) + "\n"


def run(out: Path) -> str:
    from tqdm import tqdm

    from megatron_longvila.core import cpu_adaptations, platform

    cpu_adaptations.adapt_megatron_for_cpu()
    platform.init_single_process()
    total = len(LAYER_SHAPES) * len(SETTINGS) + 2 * len(LOSS_SHAPES)
    with tqdm(total=total, desc="memory options") as bar:
        result = measure(progress=bar.update)
    result["at_scale"] = at_scale()
    text = markdown(result)
    save_json_and_markdown(out, "memory_options", result, text)
    return text
