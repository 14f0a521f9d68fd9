"""The tiny end-to-end LongVILA pipeline on CPU (``make demo``).

1. data: a tiny tokenizer, synthetic caption videos, long text with a hidden pass key, and
   videos with a digit shown in a few "needle" frames — real encoded videos in webdataset
   shards;
2. the five training stages (examples/configs/tiny/), each on 4 gloo ranks under torchrun and
   each starting from the previous one's checkpoint: alignment (TP=1, DP=4), pre-training
   (TP=2), short SFT (PP=2), context extension and long SFT (MM-SP 2×2: Ulysses × ring);
3. a table and a plot (demo_output/losses.png) of the losses;
4. the stage-5 checkpoint exported to a Hugging Face LongVILA folder (demo_output/hf: llm/,
   vision_tower/, mm_projector/, config.json), as ``tools/convert_checkpoint.py to-hf`` does;
5. a needle-in-a-haystack evaluation of that exported model with MM-SP inference
   (``longvila-eval needle``: a fresh synthetic haystack, 2 needle frames at depths 0–100%,
   8–32 frames, the digit chosen among 4 options by likelihood, chance 25%), with its heatmap
   (demo_output/needle/needle.png).

Everything lands in demo_output/ (replaced on every run).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "demo_output"
STAGES = (
    "stage1_align",
    "stage2_pretrain",
    "stage3_short_sft",
    "stage4_context_ext",
    "stage5_long_sft",
)


def make_data(nproc: int) -> None:
    from megatron_longvila.data.shard_writer import write_webdataset
    from megatron_longvila.data.synthetic import (
        build_tiny_tokenizer,
        make_passkey_text_dataset,
        make_synthetic_shards,
    )

    build_tiny_tokenizer(OUT / "tokenizer", vocab_size=400)
    data = OUT / "data"
    make_synthetic_shards(
        data / "caption", num_videos=16, num_frames=24, width=48, height=48, needle_fraction=0.0
    )
    # Many short clips, each with a single digit on 4 of its 16 frames: enough samples for the
    # tiny model to learn to read the needle within the demo's minutes.
    make_synthetic_shards(
        data / "needle",
        num_videos=512,
        num_frames=16,
        width=48,
        height=48,
        needle_fraction=1.0,
        needle_range=10,
        needle_frames=4,
    )
    jsonl = make_passkey_text_dataset(data / "passkey" / "raw", num_samples=16, filler_lines=30)
    write_webdataset(jsonl, data / "passkey" / "shards", media_root=data / "passkey" / "raw")


def run_stage(stage: str, nproc: int) -> dict:
    config = ROOT / "examples" / "configs" / "tiny" / f"{stage}.yaml"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    cmd += [f"--nproc-per-node={nproc}", "-m", "megatron_longvila.train", "--config", str(config)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    started = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, env=env, check=True)
    records = [
        json.loads(line)
        for line in (OUT / "runs" / stage / "metrics.jsonl").read_text().splitlines()
    ]
    return {
        "stage": stage,
        "steps": records[-1]["step"],
        "first_loss": records[0]["loss"],
        "last_loss": records[-1]["loss"],
        "losses": [r["loss"] for r in records],
        "seconds": time.perf_counter() - started,
    }


def export_to_hf() -> Path:
    """The stage-5 checkpoint as a Hugging Face LongVILA folder (one process, no process group)."""
    from megatron_longvila.convert import megatron_to_hf

    folder = OUT / "hf"
    megatron_to_hf(OUT / "runs" / STAGES[-1] / "checkpoints", folder, progress=False)
    return folder


def run_needle_eval(nproc: int, checkpoint: Path) -> dict:
    """The model at ``checkpoint`` on the needle task, through the evaluation CLI (torchrun)."""
    output = OUT / "needle" / "needle.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    cmd += [f"--nproc-per-node={nproc}", "-m", "megatron_longvila.eval", "needle"]
    cmd += ["--checkpoint", str(checkpoint), "--output", str(output)]
    cmd += ["--ring", "2"] if nproc % 2 == 0 and nproc > 2 else []
    cmd += ["--frame-counts", "8,16,32", "--depths", "0,25,50,75,100", "--trials", "4"]
    cmd += ["--needle-frames", "2", "--needle-range", "10", "--num-options", "4"]
    cmd += ["--haystack-size", "48"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL)
    return json.loads(output.read_text())["summary"]


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    offset = 0
    for result in results:
        steps = range(offset + 1, offset + len(result["losses"]) + 1)
        ax.plot(steps, result["losses"], marker=".", label=result["stage"])
        offset += len(result["losses"])
    ax.set_xlabel("optimizer step (stages one after another)")
    ax.set_ylabel("mean token loss")
    ax.set_title("Tiny LongVILA: five training stages on 4 CPU ranks")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nproc", type=int, default=4)
    args = parser.parse_args()

    if OUT.exists():
        shutil.rmtree(OUT)
    OUT.mkdir()
    print("== data: tokenizer, synthetic videos, long text", flush=True)
    make_data(args.nproc)
    results = []
    for stage in STAGES:
        print(f"== {stage}", flush=True)
        results.append(run_stage(stage, args.nproc))

    print("\n| stage | steps | first loss | last loss | seconds |")
    print("|---|---:|---:|---:|---:|")
    for r in results:
        print(
            f"| {r['stage']} | {r['steps']} | {r['first_loss']:.3f} | {r['last_loss']:.3f} "
            f"| {r['seconds']:.0f} |"
        )
    plot(results, OUT / "losses.png")
    (OUT / "summary.json").write_text(json.dumps(results, indent=2))
    print(f"\nplot: {OUT / 'losses.png'}; summary: {OUT / 'summary.json'}")

    print("\n== export to Hugging Face", flush=True)
    hf_folder = export_to_hf()
    print(f"{hf_folder}: {', '.join(sorted(p.name for p in hf_folder.iterdir()))}")

    print("\n== needle in a haystack (exported stage-5 model, 4 options)", flush=True)
    needle = run_needle_eval(args.nproc, hf_folder)
    by_frames = ", ".join(
        f"{n} frames {100 * a:.0f}%" for n, a in needle["accuracy_by_frames"].items()
    )
    print(
        f"accuracy {100 * needle['accuracy']:.0f}% over {needle['trials']} trials "
        f"(chance {100 * needle['chance']:.0f}%): {by_frames}"
    )
    print(f"heatmap: {OUT / 'needle' / 'needle.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
