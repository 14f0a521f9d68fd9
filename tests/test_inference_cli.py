"""``longvila-generate`` end to end: a checkpoint, a video file, torchrun, an answer.

Setup: a tiny LongVILA model whose vocabulary is a locally trained tokenizer's, saved as the
trainer saves it (``longvila_checkpoints``: ``CheckpointManager``, state under ``model``, the
training config — model section, tokenizer path, chat template — in ``train_state.json``;
nothing written for inference), and a synthetic 48-frame H.264 video with a needle frame.
Under test: ``python -m torch.distributed.run --nproc-per-node 2 -m
megatron_longvila.inference.generate --checkpoint ROOT --video FILE --prompt ... --num-frames 24
--sp 2`` (two gloo processes; each decodes only its 12 frames).
Reference: the Python API (``load_model_for_inference`` + ``Generator.generate``) on the same
checkpoint and video in one process per replica (SP = 1); the CLI's token ids must equal it
exactly, its printed answer must be the decoded text, and it reports prefill time, tokens/s, and
each rank's peak memory and KV cache (half the single-process cache, within one token per
layer). Bad paths and parallel sizes fail with messages naming them.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from longvila_checkpoints import save_tiny_longvila_checkpoint

QUESTION = "What number appears in the video?"
FRAMES, NEW_TOKENS = 24, 6


def save_and_answer(root: str, tokenizer_dir: str, video: str) -> dict | None:
    """Save the checkpoint (every rank), load it back (same config and weights), also through
    the exported Hugging Face folder, then answer with the Python API at SP = 1."""
    import torch
    from megatron.core import parallel_state

    from megatron_longvila.convert import megatron_to_hf
    from megatron_longvila.inference import FrameSettings, Generator, load_model_for_inference

    parallel_state.initialize_model_parallel()
    model, cfg, tokenizer = save_tiny_longvila_checkpoint(root, tokenizer_dir)
    loaded, source = load_model_for_inference(root)
    assert source.config == cfg, (source.config, cfg)
    for name, tensor in model.state_dict().items():
        if isinstance(tensor, torch.Tensor):
            assert torch.equal(loaded.state_dict()[name], tensor), name
    # The same weights through the Hugging Face folder the converter exports.
    hf_dir = f"{root}-hf"
    if torch_rank() == 0:
        megatron_to_hf(root, hf_dir, progress=False)
    torch.distributed.barrier()
    from_hf, hf_source = load_model_for_inference(hf_dir)
    assert hf_source.kind == "hf" and hf_source.config == cfg, hf_source.config
    vocab = cfg.llm.vocab_size  # rows past it are vocabulary padding: not exported, zeros
    for name, tensor in model.state_dict().items():
        if isinstance(tensor, torch.Tensor):
            if tensor.shape[:1] == (cfg.llm.padded_vocab_size,):
                tensor = tensor[:vocab]
            assert torch.equal(from_hf.state_dict()[name][: len(tensor)], tensor), name
    if torch_rank() != 0:  # the other data-parallel replicas would compute the same
        return None
    generator = Generator(loaded, tokenizer, frames=FrameSettings(num_frames=FRAMES))
    answer = generator.generate(QUESTION, video, max_new_tokens=NEW_TOKENS)
    return {
        "text": answer.text,
        "token_ids": answer.token_ids,
        "kv_cache_bytes": answer.generation.kv_cache_bytes,
        "prompt_length": answer.generation.prompt_length,
        "layers": cfg.llm.num_layers,
        "token_bytes": cfg.llm.num_kv_heads * cfg.llm.kv_channels * 2 * 4,
    }


def torch_rank() -> int:
    import torch.distributed as dist

    return dist.get_rank()


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, rank_pools):
    from megatron_longvila.data.synthetic import (
        SyntheticVideoSpec,
        build_tiny_tokenizer,
        write_synthetic_video,
    )

    tmp = tmp_path_factory.mktemp("generate-cli")
    tokenizer_dir = build_tiny_tokenizer(tmp / "tokenizer")
    spec = SyntheticVideoSpec(num_frames=48, width=64, height=48, needle_text="42")
    video = write_synthetic_video(tmp / "clip.mp4", spec).path
    root = tmp / "checkpoints"
    reference = rank_pools(4).run(save_and_answer, str(root), str(tokenizer_dir), str(video))[0]
    return {"tmp": tmp, "root": root, "video": video, "reference": reference}


def _run_cli(args: list[str], nproc: int) -> subprocess.CompletedProcess:
    worktree = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(worktree), "OMP_NUM_THREADS": "1"}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_PORT"):
        env.pop(name, None)
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    command = [sys.executable, *launcher, "-m", "megatron_longvila.inference.generate", *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)


def test_cli_answers_like_the_python_api(workspace):
    out = workspace["tmp"] / "answer.json"
    args = ["--checkpoint", str(workspace["root"]), "--video", str(workspace["video"])]
    args += ["--prompt", QUESTION, "--num-frames", str(FRAMES), "--sp", "2"]
    args += ["--max-new-tokens", str(NEW_TOKENS), "--output-json", str(out)]
    done = _run_cli(args, nproc=2)
    assert done.returncode == 0, done.stderr[-3000:]

    reference = workspace["reference"]
    report = json.loads(out.read_text())
    assert report["token_ids"] == reference["token_ids"]
    assert report["answer"] == reference["text"]
    assert report["frames"] == FRAMES
    assert report["prompt_tokens"] == reference["prompt_length"]
    assert report["topology"] == {"tp": 1, "ulysses": 2, "ring": 1}
    assert report["prefill_seconds"] > 0 and report["decode_tokens_per_second"] > 0
    assert len(report["ranks"]) == 2
    per_layer_token = reference["layers"] * reference["token_bytes"]
    for stats in report["ranks"]:
        assert stats["peak_memory_bytes"] > 0
        half = reference["kv_cache_bytes"] / 2
        assert abs(stats["kv_cache_bytes"] - half) <= per_layer_token, stats

    printed = done.stdout
    assert printed.startswith(reference["text"])
    for label in ("prefill:", "tokens/s", "peak memory", "KV cache"):
        assert label in printed, printed


def _args(**overrides) -> argparse.Namespace:
    values = {"tp": 1, "sp": None, "ulysses": None, "ring": None, **overrides}
    return argparse.Namespace(**values)


def test_topology_choice():
    from megatron_longvila.inference.generate import choose_topology
    from megatron_longvila.models.config import LongVILAConfig

    cfg = LongVILAConfig.preset("tiny")  # 4 heads, 2 kv heads

    def sizes(topology):
        return topology.tp, topology.ulysses, topology.ring

    # Ulysses inside a node (4 local ranks), as far as the heads allow; ring across nodes.
    assert sizes(choose_topology(_args(), 8, 4, cfg)) == (1, 4, 2)
    assert sizes(choose_topology(_args(tp=2), 8, 4, cfg)) == (2, 2, 2)
    assert sizes(choose_topology(_args(sp=4, ring=4), 4, 4, cfg)) == (1, 1, 4)
    with pytest.raises(ValueError, match=r"tp × sp = 1 × 2 must equal the world size 4"):
        choose_topology(_args(sp=2), 4, 4, cfg)
    with pytest.raises(ValueError, match=r"--ulysses 3 × --ring 2 is not --sp 4"):
        choose_topology(_args(sp=4, ulysses=3, ring=2), 4, 4, cfg)
    with pytest.raises(ValueError, match="not divisible by tp×ulysses"):
        choose_topology(_args(ulysses=8), 8, 8, cfg)


def test_checkpoint_paths_are_checked(tmp_path):
    from megatron_longvila.checkpoint.layout import CheckpointError
    from megatron_longvila.inference.loading import resolve_checkpoint

    with pytest.raises(CheckpointError, match=f"checkpoint path {tmp_path / 'x'} does not exist"):
        resolve_checkpoint(tmp_path / "x")
    with pytest.raises(CheckpointError, match="holds no checkpoint"):
        resolve_checkpoint(tmp_path)
    hf = tmp_path / "hf"
    for part in ("llm", "vision_tower", "mm_projector"):
        (hf / part).mkdir(parents=True)
    (hf / "config.json").write_text('{"chat_template": "llama3"}')
    with pytest.raises(CheckpointError, match=f"{hf} is not a readable Hugging Face LongVILA"):
        resolve_checkpoint(hf)  # the parts' configs are missing
