"""The tiny end-to-end LongVILA pipeline on CPU (``make demo``).

1. data: a tiny tokenizer; synthetic caption clips; short clips with a digit on a few "needle"
   frames; about 7.5k tokens of text with a hidden pass key; needle videos of mixed lengths,
   16 to 1024 frames — real encoded videos in webdataset shards;
2. the five training stages (examples/configs/tiny/), each on 4 gloo ranks under torchrun and
   each starting from the previous one's checkpoint: alignment on captions (TP=1, DP=4),
   pre-training on captions (TP=2), short SFT on the short needle clips (PP=2), context
   extension on the long text (RoPE base 10k → 100k, 8192 positions) and long SFT on the mixed
   lengths up to 1024 frames (4096 visual tokens), both under MM-SP Ulysses 2 × ring 2;
3. a table and a plot (demo_output/losses.png) of the losses, and how stage 1 of MM-SP spread
   the long videos' frames over the ranks (the trainer's per-rank counters);
4. the stage-5 checkpoint exported to a Hugging Face LongVILA folder (demo_output/hf: llm/,
   vision_tower/, mm_projector/, config.json), as ``tools/convert_checkpoint.py to-hf`` does;
5. a needle-in-a-haystack evaluation of that exported model with MM-SP inference on 4 ranks
   (``longvila-eval needle``: a haystack video no stage trained on, 2 needle frames inserted at
   depths 0–100% of 32 to 1024 frames, the digit chosen among 4 options by likelihood, chance
   25%), with its heatmap (demo_output/needle/needle.png) and accuracy per length; and the
   same sweep, up to 512 frames, of the stage-3 model that saw only short clips
   (demo_output/needle_short_sft/).

Everything lands in demo_output/ (replaced on every run); timings.json holds each part's time.
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


#: Lengths (frames) of the stage-5 needle videos and how many of each: mixed, up to 1024.
LONG_NEEDLE_MIX = {16: 192, 64: 96, 128: 48, 256: 48, 512: 24, 1024: 48}
#: The evaluation's lengths: from what short SFT saw to the longest stage 5 trains on. The
#: short-SFT model is evaluated too, up to 512 frames: 1024 (4147 tokens) exceed its 4096
#: positions, which context extension raises to 8192.
EVAL_FRAME_COUNTS = (32, 128, 256, 512, 1024)
BASELINE_FRAME_COUNTS = (32, 128, 256, 512)
#: Needles per (length, depth) cell: 40 per length.
EVAL_TRIALS = 8


def interleaved(mix: dict[int, int]) -> list[int]:
    """One length per video, the lengths of ``mix`` spread evenly through the list (so every
    shard holds a bit of each)."""
    order = sorted(
        ((i + 0.5) / count, frames) for frames, count in mix.items() for i in range(count)
    )
    return [frames for _, frames in order]


def make_data() -> None:
    from megatron_longvila.data.shard_writer import write_webdataset
    from megatron_longvila.data.synthetic import (
        build_tiny_tokenizer,
        make_passkey_text_dataset,
        make_synthetic_shards,
    )

    build_tiny_tokenizer(OUT / "tokenizer", vocab_size=400)
    data = OUT / "data"
    # 48×48 videos, digits 0-9 as needles. Seeds 1-3: the evaluation's haystack (seed 0) is a
    # video no stage trained on.
    size = {"width": 48, "height": 48, "needle_range": 10}
    needles = {**size, "needle_fraction": 1.0}
    make_synthetic_shards(
        data / "caption", num_videos=16, num_frames=24, needle_fraction=0.0, seed=1, **size
    )
    # Short SFT: many short clips with the digit on 4 of 16 frames, enough samples for the tiny
    # model to learn to read a needle frame.
    make_synthetic_shards(
        data / "needle_short", num_videos=512, num_frames=16, needle_frames=4, seed=2, **needles
    )
    # Long SFT: 2 needle frames in videos of 16 to 1024 frames, as the evaluation shows them.
    lengths = interleaved(LONG_NEEDLE_MIX)
    make_synthetic_shards(
        data / "needle_long",
        num_videos=len(lengths),
        num_frames=lengths,
        needle_frames=2,
        seed=3,
        **needles,
    )
    # 7.1-7.6k tokens each (about 25 per filler line): the lengths context extension trains on.
    jsonl = make_passkey_text_dataset(data / "passkey" / "raw", num_samples=16, filler_lines=290)
    write_webdataset(jsonl, data / "passkey" / "shards", media_root=data / "passkey" / "raw")


def torchrun(nproc: int, module: str, args: list[str], quiet: bool = False) -> None:
    """``python -m module args`` on ``nproc`` local ranks (one thread each); ``quiet`` drops
    its stdout (progress bars go to stderr)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    cmd += [f"--nproc-per-node={nproc}", "-m", module, *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    stdout = subprocess.DEVNULL if quiet else None
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, stdout=stdout)


def run_stage(stage: str, nproc: int) -> dict:
    config = ROOT / "examples" / "configs" / "tiny" / f"{stage}.yaml"
    torchrun(nproc, "megatron_longvila.train", ["--config", str(config)])
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
        "records": records,
    }


def frame_spreading(records: list[dict], min_frames: int = 1024) -> dict:
    """What the trainer counted of stage 1 in the steps that held a video of at least
    ``min_frames`` frames: the step's videos and the frames each rank encoded."""
    steps = [
        {"step": r["step"], "videos": r["media_frames"], "frames_by_rank": r["frames_by_rank"]}
        for r in records
        if max(r["media_frames"], default=0) >= min_frames
    ]
    shares = [
        count / sum(step["frames_by_rank"]) for step in steps for count in step["frames_by_rank"]
    ]
    return {
        "min_frames": min_frames,
        "steps": steps,
        "share_min": min(shares, default=None),
        "share_max": max(shares, default=None),
    }


def export_to_hf() -> Path:
    """The stage-5 checkpoint as a Hugging Face LongVILA folder (one process, no process group)."""
    from megatron_longvila.convert import megatron_to_hf

    folder = OUT / "hf"
    megatron_to_hf(OUT / "runs" / STAGES[-1] / "checkpoints", folder, progress=False)
    return folder


def run_needle_eval(
    nproc: int, checkpoint: Path, output: Path, frame_counts: tuple[int, ...]
) -> dict:
    """The model at ``checkpoint`` on the needle task, through the evaluation CLI (torchrun)."""
    cmd = ["needle", "--checkpoint", str(checkpoint), "--output", str(output)]
    cmd += ["--ring", "2"] if nproc % 2 == 0 and nproc > 2 else []
    cmd += ["--frame-counts", ",".join(map(str, frame_counts))]
    cmd += ["--depths", "0,25,50,75,100", "--trials", str(EVAL_TRIALS)]
    cmd += ["--needle-frames", "2", "--needle-range", "10", "--num-options", "4"]
    cmd += ["--haystack-size", "48", "--seed", "0"]
    torchrun(nproc, "megatron_longvila.eval", cmd, quiet=True)
    return json.loads(output.read_text())["summary"]


def print_accuracy(name: str, summary: dict) -> None:
    print(
        f"{name}: {100 * summary['accuracy']:.0f}% of {summary['trials']} trials "
        f"(chance {100 * summary['chance']:.0f}%)"
    )
    print("| frames | accuracy | chance |\n|---:|---:|---:|")
    for frames, accuracy in summary["accuracy_by_frames"].items():
        print(f"| {frames} | {100 * accuracy:.0f}% | {100 * summary['chance']:.0f}% |")


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    offset = 0
    for result in results:
        steps = range(offset + 1, offset + len(result["losses"]) + 1)
        ax.plot(steps, result["losses"], marker=".", markersize=3, label=result["stage"])
        offset += len(result["losses"])
    ax.set_xlabel("optimizer step (stages one after another)")
    ax.set_ylabel("mean token loss")
    ax.set_title("Tiny LongVILA: five training stages on 4 CPU ranks")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


class Timer:
    """Wall time of each named part of the demo, printed as it ends."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def part(self, name: str, work, *args):
        print(f"== {name}", flush=True)
        started = time.perf_counter()
        result = work(*args)
        self.seconds[name] = time.perf_counter() - started
        print(f"-- {name}: {self.seconds[name]:.0f} s", flush=True)
        return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nproc", type=int, default=4)
    args = parser.parse_args()

    started = time.perf_counter()
    if OUT.exists():
        shutil.rmtree(OUT)
    OUT.mkdir()
    timer = Timer()
    timer.part("data: tokenizer, synthetic videos, long text", make_data)
    results = [timer.part(stage, run_stage, stage, args.nproc) for stage in STAGES]

    print("\n| stage | steps | first loss | last loss | seconds |")
    print("|---|---:|---:|---:|---:|")
    for r in results:
        print(
            f"| {r['stage']} | {r['steps']} | {r['first_loss']:.3f} | {r['last_loss']:.3f} "
            f"| {timer.seconds[r['stage']]:.0f} |"
        )
    plot(results, OUT / "losses.png")
    spreading = frame_spreading(results[-1]["records"])
    summary = [{k: v for k, v in r.items() if k != "records"} for r in results]
    (OUT / "summary.json").write_text(
        json.dumps({"stages": summary, "stage5_frame_spreading": spreading}, indent=2)
    )
    print(f"\nplot: {OUT / 'losses.png'}; summary: {OUT / 'summary.json'}")
    print(
        f"\nstage 1 of MM-SP in stage 5 (the trainer's counters): {len(spreading['steps'])} steps "
        f"held a video of {spreading['min_frames']} frames; each rank encoded "
        f"{100 * (spreading['share_min'] or 0):.1f}–{100 * (spreading['share_max'] or 0):.1f}% "
        "of those steps' frames"
    )
    shown = {}
    for step in spreading["steps"]:  # one example of each mix of videos
        shown.setdefault(tuple(sorted(step["videos"], reverse=True)), step)
    for step in list(shown.values())[:4]:
        print(
            f"  step {step['step']}: videos of {step['videos']} frames, "
            f"frames encoded by each rank: {step['frames_by_rank']}"
        )

    hf_folder = timer.part("export to Hugging Face", export_to_hf)
    print(f"{hf_folder}: {', '.join(sorted(p.name for p in hf_folder.iterdir()))}")

    needle = timer.part(
        "needle in a haystack: the exported stage-5 model",
        run_needle_eval,
        args.nproc,
        hf_folder,
        OUT / "needle" / "needle.json",
        EVAL_FRAME_COUNTS,
    )
    print_accuracy("stage-5 model (exported)", needle)
    print(f"heatmap: {OUT / 'needle' / 'needle.png'}; results: {OUT / 'needle' / 'needle.json'}")
    baseline = timer.part(
        "needle in a haystack: the stage-3 model, before long training",
        run_needle_eval,
        args.nproc,
        OUT / "runs" / "stage3_short_sft" / "checkpoints",
        OUT / "needle_short_sft" / "needle.json",
        BASELINE_FRAME_COUNTS,
    )
    print_accuracy("stage-3 model (short SFT only)", baseline)

    timer.seconds["total"] = time.perf_counter() - started
    (OUT / "timings.json").write_text(json.dumps(timer.seconds, indent=2))
    print("\n| part | seconds |\n|---|---:|")
    for name, seconds in timer.seconds.items():
        print(f"| {name} | {seconds:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
