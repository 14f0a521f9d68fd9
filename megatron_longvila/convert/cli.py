"""Convert LongVILA checkpoints between megatron dist checkpoints and Hugging Face folders.

Megatron → Hugging Face (one process; any TP/PP/SP layout of the checkpoint):

    longvila-convert to-hf runs/stage5/checkpoints out/longvila-hf

Hugging Face → Megatron (a LongVILA folder, or plain LLM + SigLIP folders), written with
tensor/pipeline-parallel sizes --tp/--pp; spawns tp×pp CPU processes, or runs on the ranks of
torchrun:

    longvila-convert to-megatron ckpt/init --hf out/longvila-hf --tp 2 --pp 2
    longvila-convert to-megatron ckpt/init --llm Qwen2-7B-Instruct \\
        --vision-tower siglip-so400m-patch14-384 --tp 4
    torchrun --nproc-per-node 4 -m megatron_longvila.convert.cli to-megatron ckpt/init \\
        --hf out/longvila-hf --tp 4

Existing output is never replaced without --force. Only safetensors weights are read.
(``tools/convert_checkpoint.py`` runs the same command.)
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
import yaml

from megatron_longvila.checkpoint.layout import CheckpointError
from megatron_longvila.convert import (
    ConversionError,
    HFSource,
    hf_to_megatron,
    megatron_to_hf,
)
from megatron_longvila.convert.outputs import describe_os_error
from megatron_longvila.core import cpu_adaptations, platform
from megatron_longvila.models.config import TOKEN_ORDERS, ConfigError, LongVILAConfig


def _model_config(value: str | None) -> LongVILAConfig | None:
    """A preset name or a YAML/JSON file holding a LongVILAConfig mapping."""
    if value is None:
        return None
    path = Path(value)
    if path.is_file():
        return LongVILAConfig.from_dict(yaml.safe_load(path.read_text(encoding="utf-8")))
    return LongVILAConfig.preset(value)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)

    to_hf = commands.add_parser("to-hf", help="megatron dist checkpoint → Hugging Face folder")
    to_hf.add_argument("checkpoint", help="checkpoint root (follows 'latest') or iter_* folder")
    to_hf.add_argument("output", help="Hugging Face folder to write")
    to_hf.add_argument("--tokenizer", help="tokenizer folder (default: the checkpoint's record)")
    to_hf.add_argument("--no-tokenizer", action="store_true", help="write no tokenizer files")
    to_hf.add_argument(
        "--model", help="architecture: preset name or YAML/JSON file (default: the checkpoint's)"
    )
    to_hf.add_argument("--num-frames", type=int, help="frames per video for config.json")
    to_hf.add_argument("--max-shard-gb", type=float, default=5.0, help="largest weights file")

    to_mg = commands.add_parser("to-megatron", help="Hugging Face folders → dist checkpoint")
    to_mg.add_argument("output", help="checkpoint root to write (iter_0000000 + latest)")
    to_mg.add_argument("--hf", help="LongVILA folder (llm/, vision_tower/, mm_projector/)")
    to_mg.add_argument("--llm", help="plain Qwen2/Llama folder (with --vision-tower)")
    to_mg.add_argument("--vision-tower", help="plain SigLIP (vision) folder")
    to_mg.add_argument("--mm-projector", help="projector folder (default: freshly initialized)")
    to_mg.add_argument("--tp", type=int, default=1, help="tensor-parallel size to write")
    to_mg.add_argument("--pp", type=int, default=1, help="pipeline-parallel size to write")
    to_mg.add_argument("--seed", type=int, default=1234, help="seed of a fresh projector")
    to_mg.add_argument("--image-token-id", type=int, help="id of <image> (default: config)")
    to_mg.add_argument("--video-token-id", type=int, help="id of <video> (default: config)")
    to_mg.add_argument("--select-layer", type=int, help="vision layer fed to the projector")
    to_mg.add_argument("--vocab-pad-multiple", type=int, help="embedding rows rounded up to it")
    to_mg.add_argument(
        "--token-order", choices=TOKEN_ORDERS, help="of the projector, if the folder cannot tell"
    )
    to_mg.add_argument("--num-frames", type=int, help="frames per video to record")

    for command in (to_hf, to_mg):
        command.add_argument(
            "--dtype",
            choices=("float32", "bfloat16", "float16"),
            help="cast weights (default: keep)",
        )
        command.add_argument("--force", action="store_true", help="replace a non-empty output")
        command.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    if args.command == "to-megatron" and not (args.hf or (args.llm and args.vision_tower)):
        parser.error("to-megatron needs --hf, or --llm and --vision-tower")
    return args


def _hf_source(args: argparse.Namespace) -> HFSource:
    settings = {
        "image_token_id": args.image_token_id,
        "video_token_id": args.video_token_id,
        "mm_vision_select_layer": args.select_layer,
        "vocab_pad_multiple": args.vocab_pad_multiple,
        "token_order": args.token_order,
        "num_video_frames": args.num_frames,
    }
    if args.hf:
        return HFSource.from_folder(args.hf, **{k: v for k, v in settings.items() if v is not None})
    return HFSource.from_parts(args.llm, args.vision_tower, args.mm_projector, **settings)


def _init_torchrun() -> None:
    """Join the process group when started by torchrun (more than one rank)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        cpu_adaptations.adapt_megatron_for_cpu()
        platform.init_distributed()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    dtype = platform.dtype_from_name(args.dtype)
    rank = int(os.environ.get("RANK", "0"))
    try:
        if args.command == "to-hf":
            directory = megatron_to_hf(
                args.checkpoint,
                args.output,
                config=_model_config(args.model),
                tokenizer=args.tokenizer,
                skip_tokenizer=args.no_tokenizer,
                num_frames=args.num_frames,
                dtype=dtype,
                max_shard_bytes=int(args.max_shard_gb * 1024**3),
                force=args.force,
                progress=not args.quiet,
            )
            print(f"exported {directory} to {args.output}")
        else:
            _init_torchrun()
            directory = hf_to_megatron(
                _hf_source(args),
                args.output,
                tp=args.tp,
                pp=args.pp,
                dtype=dtype,
                seed=args.seed,
                force=args.force,
                progress=not args.quiet,
            )
            if rank == 0:
                print(f"wrote {directory} (tp={args.tp}, pp={args.pp})")
    except (ConversionError, CheckpointError, ConfigError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except OSError as error:
        print(f"error: {describe_os_error(error)}", file=sys.stderr)
        return 2
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
