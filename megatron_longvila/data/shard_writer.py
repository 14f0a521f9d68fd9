"""Folder of videos/images + JSONL of conversations -> Energon-ready webdataset shards.

Input records (one JSON object per line)::

    {"id": "clip42", "video": "clips/42.mp4", "conversations": [
        {"from": "human", "value": "<video>\\nWhat happens?"}, {"from": "gpt", "value": "..."}]}

A caption record has a ``caption`` string instead of ``conversations`` (and at least one media
item)::

    {"id": "clip43", "video": "clips/43.mp4", "caption": "A dog runs after a ball."}

Media fields: ``video`` / ``videos`` / ``image`` / ``images`` (paths relative to the media
root, which they may not leave). No media field: a text-only sample. Other fields are kept as
metadata in the sample's ``.json``.

Output: ``<out>/shard-000000.tar``, ... each at most ``max_shard_bytes`` (a single larger sample
gets a shard of its own), then Energon's metadata (``shard_index.prepare_energon_dataset``).
Each sample is ``<key>.json`` (``{"conversations": [...], ...metadata}``) plus ``<key>.<ext>``
for one media item or ``<key>.<i>.<ext>`` for several, numbered in the order their placeholders
appear in the text. A caption record is written in video2dataset's layout: ``<key>.txt`` (the
caption), ``<key>.json`` (the metadata) and the media; the loader turns it into a conversation
with ``DataConfig.caption_prompt``. Every video is probed first (header, first and last frame
decoded); records with unreadable media, bad paths or invalid conversations are reported and
skipped. Shards are
written to a temporary name and renamed when complete. Nothing is written outside ``<out>``.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

from megatron.energon.flavors.webdataset.config import MAIN_FOLDER_NAME

from megatron_longvila.data.chat_template import ConversationError, normalize_conversation
from megatron_longvila.data.sample_format import (
    IMAGE_EXTENSIONS,
    VIDEO_EXTENSIONS,
    placeholder_sequence,
)
from megatron_longvila.data.shard_index import PrepareReport, prepare_energon_dataset
from megatron_longvila.data.video import VideoDecodeError, check_video_readable

logger = logging.getLogger(__name__)

MEDIA_FIELDS = {"video": "video", "videos": "video", "image": "image", "images": "image"}
SHARD_PATTERN = "shard-{:06d}.tar"
_SHARD_NAME_RE = re.compile(r"^shard-\d{6}\.tar(\.idx|\.tmp)?$")


@dataclass
class SkippedRecord:
    line: int
    id: str
    reason: str


@dataclass
class WriteReport:
    out_dir: Path
    shards: list[str] = field(default_factory=list)
    samples: int = 0
    skipped: list[SkippedRecord] = field(default_factory=list)
    prepare: PrepareReport | None = None


class _RecordError(ValueError):
    pass


def _tar_member_bytes(size: int) -> int:
    return tarfile.BLOCKSIZE + -(-size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE


def _tar_file_bytes(member_bytes: int) -> int:
    """Size of a tar holding members of ``member_bytes``: plus two zero end blocks, rounded up
    to whole 10 KiB records as tarfile writes it."""
    return -(-(member_bytes + 2 * tarfile.BLOCKSIZE) // tarfile.RECORDSIZE) * tarfile.RECORDSIZE


class ShardWriter:
    """Writes samples into tar shards of bounded size under one folder."""

    def __init__(self, out_dir: Path, max_shard_bytes: int, max_shard_samples: int | None) -> None:
        self.out_dir = out_dir
        self.max_bytes = max_shard_bytes
        self.max_samples = max_shard_samples
        self.shards: list[str] = []
        self._tar: tarfile.TarFile | None = None
        self._bytes = 0
        self._samples = 0

    def _open_next(self) -> None:
        self.close()
        name = SHARD_PATTERN.format(len(self.shards))
        self.shards.append(name)
        path = self.out_dir / (name + ".tmp")
        self._tar = tarfile.open(path, "w", format=tarfile.USTAR_FORMAT)  # noqa: SIM115 (closed in close())
        self._bytes = self._samples = 0

    def add(self, key: str, parts: dict[str, bytes]) -> None:
        size = sum(_tar_member_bytes(len(data)) for data in parts.values())
        full = self._tar is None or (
            self._samples > 0
            and (
                _tar_file_bytes(self._bytes + size) > self.max_bytes
                or (self.max_samples is not None and self._samples >= self.max_samples)
            )
        )
        if full:
            self._open_next()
        for ext, data in parts.items():
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mode, info.mtime = len(data), 0o644, 0
            self._tar.addfile(info, io.BytesIO(data))
        self._bytes += size
        self._samples += 1

    def close(self) -> None:
        if self._tar is not None:
            self._tar.close()
            self._tar = None
            name = self.shards[-1]
            os.replace(self.out_dir / (name + ".tmp"), self.out_dir / name)


def _sample_key(record: dict, line: int, used: set[str]) -> str:
    raw = str(record.get("id", f"sample_{line:08d}"))
    key = re.sub(r"[^A-Za-z0-9_-]", "_", raw) or f"sample_{line:08d}"
    base, n = key, 1
    while key in used:
        key, n = f"{base}_{n}", n + 1
    used.add(key)
    return key


def _media_items(record: dict) -> dict[str, list[str]]:
    items: dict[str, list[str]] = {"video": [], "image": []}
    for name, kind in MEDIA_FIELDS.items():
        value = record.get(name)
        if value is None:
            continue
        paths = [value] if isinstance(value, str) else value
        if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
            raise _RecordError(f"field {name!r} must be a path or a list of paths")
        items[kind] += paths
    return items


def _read_media(media_root: Path, relative: str, kind: str) -> tuple[str, bytes]:
    path = (media_root / relative).resolve()
    if media_root not in path.parents:
        raise _RecordError(f"{kind} path {relative!r} leaves the media root {media_root}")
    ext = path.suffix.lstrip(".").lower()
    allowed = VIDEO_EXTENSIONS if kind == "video" else IMAGE_EXTENSIONS
    if ext not in allowed:
        raise _RecordError(f"{kind} {relative!r}: extension .{ext} is not one of {allowed}")
    if not path.is_file():
        raise _RecordError(f"{kind} {relative!r} does not exist")
    data = path.read_bytes()
    if kind == "video":
        try:
            check_video_readable(data)
        except VideoDecodeError as exc:
            raise _RecordError(f"video {relative!r} is unreadable: {exc}") from exc
    else:
        from PIL import Image

        try:
            with Image.open(io.BytesIO(data)) as img:
                img.verify()
        except Exception as exc:
            raise _RecordError(f"image {relative!r} is unreadable: {exc}") from exc
    return ext, data


def _caption_of(record: dict) -> str | None:
    """The caption of a caption record (no ``conversations``), None for a conversation record."""
    if "conversations" in record or "caption" not in record:
        return None
    caption = record["caption"]
    if not isinstance(caption, str) or not caption.strip():
        raise _RecordError(f"caption must be a non-empty string, got {caption!r}")
    return caption.strip()


def sample_parts(record: dict, media_root: Path) -> dict[str, bytes]:
    """The tar parts (extension -> bytes) of one JSONL record; raises on anything invalid."""
    caption = _caption_of(record)
    turns = [] if caption is not None else record.get("conversations")
    if caption is None:
        try:
            normalize_conversation(turns)
        except ConversationError as exc:
            raise _RecordError(f"invalid conversation: {exc}") from exc
    items = _media_items(record)
    if caption is not None and not items["video"] + items["image"]:
        raise _RecordError("a caption record needs a video or an image to describe")
    order = placeholder_sequence(turns)
    counts = {kind: order.count(kind) for kind in items}
    if order and any(counts[k] != len(items[k]) for k in items):
        raise _RecordError(
            f"text has {counts['video']} <video> and {counts['image']} <image> placeholders but "
            f"the record lists {len(items['video'])} videos and {len(items['image'])} images"
        )
    if not order:  # no placeholders: the task encoder prepends them, videos first
        order = ["video"] * len(items["video"]) + ["image"] * len(items["image"])
    next_of = {kind: iter(paths) for kind, paths in items.items()}
    media = [(kind, *_read_media(media_root, next(next_of[kind]), kind)) for kind in order]
    meta = {k: v for k, v in record.items() if k not in MEDIA_FIELDS and k != "caption"}
    if caption is None:
        meta["conversations"] = turns
    meta["media"] = [kind for kind, _, _ in media]
    parts = {"json": json.dumps(meta, ensure_ascii=False).encode("utf-8")}
    if caption is not None:
        parts["txt"] = caption.encode("utf-8")
    for i, (_, ext, data) in enumerate(media):
        parts[ext if len(media) == 1 else f"{i}.{ext}"] = data
    return parts


def _prepare_out_dir(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists():
        existing = [p for p in out_dir.iterdir()]
        if existing and not overwrite:
            raise FileExistsError(
                f"output folder {out_dir} is not empty ({len(existing)} entries); pass "
                "overwrite=True to replace shards written there before"
            )
        for p in existing:
            if p.is_file() and (_SHARD_NAME_RE.match(p.name) or p.name.endswith(".recovered.tar")):
                p.unlink()
        meta = out_dir / MAIN_FOLDER_NAME
        if meta.is_dir():
            for p in meta.iterdir():
                if p.is_file():
                    p.unlink()
    out_dir.mkdir(parents=True, exist_ok=True)


def write_webdataset(
    jsonl: str | Path,
    out_dir: str | Path,
    media_root: str | Path | None = None,
    max_shard_bytes: int = 1 << 30,
    max_shard_samples: int | None = None,
    val_fraction: float = 0.0,
    overwrite: bool = False,
) -> WriteReport:
    """Write shards and Energon metadata; see the module docstring. ``media_root`` defaults to
    the JSONL's folder."""
    jsonl, out_dir = Path(jsonl), Path(out_dir)
    media_root = Path(media_root if media_root is not None else jsonl.parent).resolve()
    if max_shard_bytes < tarfile.RECORDSIZE:
        raise ValueError(f"max_shard_bytes={max_shard_bytes} is too small for a tar shard")
    _prepare_out_dir(out_dir, overwrite)
    report = WriteReport(out_dir=out_dir)
    writer = ShardWriter(out_dir, max_shard_bytes, max_shard_samples)
    used_keys: set[str] = set()
    try:
        with jsonl.open(encoding="utf-8") as lines:
            for number, line in enumerate(lines, start=1):
                if not line.strip():
                    continue
                record_id = f"line {number}"
                try:
                    record = json.loads(line)
                    if not isinstance(record, dict):
                        raise _RecordError("a line must hold a JSON object")
                    record_id = str(record.get("id", record_id))
                    parts = sample_parts(record, media_root)
                except (ValueError, _RecordError) as exc:
                    report.skipped.append(SkippedRecord(number, record_id, str(exc)))
                    logger.warning("skipping %s (line %d): %s", record_id, number, exc)
                    continue
                writer.add(_sample_key(record, number, used_keys), parts)
                report.samples += 1
    finally:
        writer.close()
    report.shards = list(writer.shards)
    if report.samples == 0:
        raise ValueError(
            f"no sample of {jsonl} could be written ({len(report.skipped)} skipped); first "
            f"problem: {report.skipped[0].reason if report.skipped else 'the file is empty'}"
        )
    report.prepare = prepare_energon_dataset(out_dir, report.shards, val_fraction=val_fraction)
    return report
