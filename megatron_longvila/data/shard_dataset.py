"""The Energon dataset type that ``.nv-meta/dataset.yaml`` of our shards names.

It is Energon's ``CrudeWebdataset`` (raw parts handed to the task encoder's cooker) with one
piece replaced: reading a sample's bytes from its shard. Energon 7.4.1 lets a read error (a tar
cut short after it was indexed: ``tarfile.ReadError: unexpected end of data``) escape from the
sample loader and stop the whole data loader. Here the error becomes a sample carrying
``__read_error__``, which the task encoder counts and skips.
"""

from __future__ import annotations

import tarfile
from typing import Any

from megatron.energon import CrudeWebdataset
from megatron.energon.flavors.webdataset.config import split_name_re
from megatron.energon.flavors.webdataset.sample_loader import WebdatasetSampleLoaderDataset
from megatron.energon.source_info import SourceInfo

READ_ERROR_FIELD = "__read_error__"
_READ_ERRORS = (tarfile.TarError, OSError, EOFError, ValueError)


class ReportingShardReader:
    """Wraps an Energon ITarReader; a sample that cannot be read is returned as a marker."""

    def __init__(self, reader: Any) -> None:
        self._reader = reader

    def __getattr__(self, name: str) -> Any:
        return getattr(self._reader, name)

    def __len__(self) -> int:
        return len(self._reader)

    def __getitem__(self, index: int) -> Any:
        try:
            return self._reader[index]
        except _READ_ERRORS as exc:
            return self._unreadable(index, exc)

    def _unreadable(self, index: int, exc: Exception) -> dict:
        shard, key = "?", f"#{index}"
        try:
            pointer = self._reader._get_itar_sample_pointer(index)
            shard = self._reader.tar_filenames[pointer.tar_file_id]
            key = f"{shard}#{index}"
            with self._reader.tar_filepaths[pointer.tar_file_id].open("rb") as f:
                f.seek(pointer.byte_offset)
                header = f.read(tarfile.BLOCKSIZE)
            name = tarfile.TarInfo.frombuf(header, "utf-8", "surrogateescape").name
            match = split_name_re.match(name)
            if match:
                key = match.group(1)
        except Exception:  # the key is best effort; the error itself is what matters
            pass
        return {
            "__key__": key,
            "__shard__": shard,
            "__restore_key__": ("Webdataset", index),
            "__sources__": (
                SourceInfo(
                    dataset_path=self._reader.base_path,
                    index=index,
                    shard_name=shard,
                    file_names=(),
                ),
            ),
            READ_ERROR_FIELD: f"{type(exc).__name__}: {exc}",
        }


class LongVILAWebdataset(CrudeWebdataset):
    """``CrudeWebdataset`` whose shard readers report unreadable samples instead of raising."""

    def build(self, worker_rotation_offset: int = 0):
        dataset = super().build(worker_rotation_offset=worker_rotation_offset)
        loader = dataset.dataset
        if not isinstance(loader, WebdatasetSampleLoaderDataset):
            raise TypeError(
                f"expected Energon's WebdatasetSampleLoaderDataset inside the built dataset, got "
                f"{type(loader).__name__}; this class targets megatron-energon 7.4.1"
            )
        loader.join_readers = [ReportingShardReader(r) for r in loader.join_readers]
        return dataset
