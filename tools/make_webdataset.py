"""Turn a folder of videos/images plus a JSONL of conversations or captions into Energon shards.

    python tools/make_webdataset.py samples.jsonl out/shards --media-root videos/ --max-shard-mb 512

Every video is probed first; unreadable media, paths outside the media root and invalid
conversations are reported and skipped. The Energon metadata (``.nv-meta/``) is written without
prompts. See ``megatron_longvila.data.shard_writer`` for the formats.
"""

from __future__ import annotations

import argparse
import logging
import sys

from megatron_longvila.data.shard_writer import write_webdataset


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument(
        "jsonl",
        help="one JSON object per line: id, video/videos/image/images, and conversations "
        "(or caption: a caption sample)",
    )
    parser.add_argument("out_dir", help="output folder (created; must be empty unless --overwrite)")
    parser.add_argument(
        "--media-root",
        default=None,
        help="folder the media paths are relative to (default: the JSONL's folder)",
    )
    parser.add_argument(
        "--max-shard-mb", type=float, default=1024.0, help="largest shard size in MiB"
    )
    parser.add_argument(
        "--max-shard-samples", type=int, default=None, help="most samples per shard"
    )
    parser.add_argument(
        "--val-fraction", type=float, default=0.0, help="fraction of shards in the 'val' split"
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace shards written to out_dir before"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    report = write_webdataset(
        args.jsonl,
        args.out_dir,
        media_root=args.media_root,
        max_shard_bytes=int(args.max_shard_mb * (1 << 20)),
        max_shard_samples=args.max_shard_samples,
        val_fraction=args.val_fraction,
        overwrite=args.overwrite,
    )
    print(f"wrote {report.samples} samples in {len(report.shards)} shards to {report.out_dir}")
    for skipped in report.skipped:
        print(f"skipped {skipped.id} (line {skipped.line}): {skipped.reason}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
