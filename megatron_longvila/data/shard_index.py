"""Energon metadata for a folder of webdataset tar shards, written without prompts.

``energon prepare`` asks which split ratio and sample type to use. :func:`prepare_energon_dataset`
answers them in code: it calls Energon's own ``BaseWebdatasetFactory.prepare_dataset`` (which
writes ``.nv-meta/index.sqlite``, ``index.uuid``, ``.info.json``, ``split.yaml`` and a
``<shard>.tar.idx`` next to every shard) and then writes ``.nv-meta/dataset.yaml`` naming
:class:`~megatron_longvila.data.shard_dataset.LongVILAWebdataset` (Energon's
``CrudeWebdataset`` whose shard reader reports unreadable samples instead of stopping).

Shards cut short: Energon 7.4.1 logs "Shard failed to load ... Skipping it" and then fails the
whole preparation with ``AssertionError: Shard ... has no samples``. Here every shard is scanned
first; from a shard cut short, the samples whose bytes are all present are copied to
``<name>.recovered.tar`` (the damaged file is left untouched and out of the index) and the
samples lost are reported by key.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

from megatron.energon.flavors.webdataset.config import MAIN_FOLDER_NAME, skip_meta_re, split_name_re

logger = logging.getLogger(__name__)

DATASET_YAML = """\
__module__: megatron_longvila.data.shard_dataset
__class__: LongVILAWebdataset
"""
RECOVERED_SUFFIX = ".recovered.tar"


@dataclass
class TarScan:
    """What a tar shard holds: complete sample keys in order, and whether it is cut short."""

    complete: list[str] = field(default_factory=list)
    lost: list[str] = field(default_factory=list)
    truncated: bool = False
    reason: str = ""


@dataclass
class TruncatedShard:
    name: str
    recovered_name: str | None
    kept: int
    lost_keys: list[str]
    reason: str


@dataclass
class PrepareReport:
    dataset_dir: Path
    shards: list[str]
    samples: int
    truncated: list[TruncatedShard] = field(default_factory=list)


def _key_of(name: str) -> str | None:
    match = split_name_re.match(name)
    return match.group(1) if match and not skip_meta_re.match(name) else None


def scan_tar(path: str | Path) -> TarScan:
    """Walk the headers of a tar shard and check that every member's bytes are present.

    When the file is cut short, the sample being cut (the one whose member lacks bytes, or whose
    next header is partial) counts as lost; the samples before it are complete.
    """
    path = Path(path)
    size = path.stat().st_size
    keys: list[str] = []
    with path.open("rb") as fileobj:
        try:
            tar = tarfile.open(fileobj=fileobj, mode="r:")  # noqa: SIM115 (fileobj is managed)
        except tarfile.TarError as exc:
            return TarScan(truncated=True, reason=f"not a readable tar: {exc}")
        while True:
            try:
                member = tar.next()
            except tarfile.TarError as exc:
                return TarScan(keys[:-1], keys[-1:], True, f"{type(exc).__name__}: {exc}")
            if member is None:
                break
            key = _key_of(member.name) if member.isreg() else None
            if key is not None and (not keys or keys[-1] != key):
                keys.append(key)
            if member.offset_data + member.size > size:
                reason = (
                    f"member {member.name} needs bytes up to {member.offset_data + member.size} "
                    f"of a {size}-byte file"
                )
                return TarScan(keys[:-1], keys[-1:], True, reason)
        # tarfile stops silently at a partial header; only zero padding may follow the last member.
        fileobj.seek(tar.offset)
        tail = fileobj.read()
    if not tail.strip(b"\0"):
        return TarScan(complete=keys)
    partial_name = tail[:100].split(b"\0", 1)[0].decode("utf-8", "replace")
    partial_key = _key_of(partial_name)
    reason = f"partial tar header at byte {tar.offset} of a {size}-byte file"
    if partial_key is not None and keys and keys[-1] == partial_key:
        return TarScan(keys[:-1], keys[-1:], True, reason)
    return TarScan(keys, [partial_key] if partial_key else [], True, reason)


def _write_recovered(src: Path, dst: Path, keep: set[str]) -> int:
    """Copy the members of samples in ``keep`` from ``src`` into a new tar ``dst``."""
    tmp = dst.with_name(dst.name + ".tmp")
    kept = set()
    with (
        src.open("rb") as fileobj,
        tarfile.open(fileobj=fileobj, mode="r:") as tar,
        tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as out,
    ):
        while True:
            try:
                member = tar.next()
            except tarfile.TarError:
                break
            if member is None:
                break
            key = _key_of(member.name)
            if key is None or key not in keep or not member.isreg():
                continue
            out.addfile(member, io.BytesIO(tar.extractfile(member).read()))
            kept.add(key)
    os.replace(tmp, dst)
    return len(kept)


def _check_inside(base: Path, name: str) -> None:
    resolved = (base / name).resolve()
    if base.resolve() not in resolved.parents:
        raise ValueError(f"shard {name!r} lies outside the dataset folder {base}")


def prepare_energon_dataset(
    dataset_dir: str | Path,
    shards: list[str] | None = None,
    val_fraction: float = 0.0,
    workers: int | None = None,
) -> PrepareReport:
    """Write Energon's metadata for the tar shards in ``dataset_dir`` (all ``*.tar`` below it,
    or ``shards``, relative paths), without prompts; recover shards cut short.

    ``val_fraction`` of the shards (by count, rounded down) go to the "val" split, the rest to
    "train". Nothing is written outside ``dataset_dir``.
    """
    from megatron.energon.epathlib import EPath
    from megatron.energon.flavors.webdataset.base_webdataset import BaseWebdatasetFactory

    base = Path(dataset_dir)
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if shards is None:
        shards = sorted(
            str(p.relative_to(base))
            for p in base.rglob("*.tar")
            if not p.name.endswith(RECOVERED_SUFFIX)
        )
    report = PrepareReport(dataset_dir=base, shards=[], samples=0)
    for name in shards:
        _check_inside(base, name)
        scan = scan_tar(base / name)
        if not scan.truncated:
            if scan.complete:
                report.shards.append(name)
                report.samples += len(scan.complete)
            continue
        recovered = None
        if scan.complete:
            recovered = name[: -len(".tar")] + RECOVERED_SUFFIX
            _write_recovered(base / name, base / recovered, set(scan.complete))
            report.shards.append(recovered)
            report.samples += len(scan.complete)
        report.truncated.append(
            TruncatedShard(name, recovered, len(scan.complete), scan.lost, scan.reason)
        )
        logger.warning(
            "shard %s is cut short (%s): kept %d complete samples%s, lost %s",
            name,
            scan.reason,
            len(scan.complete),
            f" in {recovered}" if recovered else "",
            scan.lost or "no complete sample",
        )
    if not report.shards:
        raise ValueError(f"no readable samples in the shards of {base} ({len(shards)} tar files)")
    (base / MAIN_FOLDER_NAME).mkdir(exist_ok=True)
    ratio = [("train", 1.0 - val_fraction), ("val", val_fraction), ("test", 0.0)]
    # Energon prints progress lines to stdout; keep them out of callers' output.
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        BaseWebdatasetFactory.prepare_dataset(
            EPath(base),
            report.shards,
            split_parts_ratio=ratio,
            workers=workers or max(1, min(len(report.shards), os.cpu_count() or 1, 8)),
        )
    logger.debug("energon prepare: %s", printed.getvalue().strip())
    (base / MAIN_FOLDER_NAME / "dataset.yaml").write_text(DATASET_YAML)
    return report
