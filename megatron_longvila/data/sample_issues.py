"""Problems found in samples: counted across the loader's worker processes, logged once per key.

Each kind of problem has a documented outcome (see :data:`ISSUES`). The counters live in shared
memory created before Energon forks its workers, so the training process reads the totals of
all its workers; counts cover this process's lifetime (samples replayed after a restore count
again).
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
import traceback
from typing import Any, NoReturn

from megatron.energon import SkipSample

logger = logging.getLogger("megatron_longvila.data")

#: kind -> what happens to the sample.
ISSUES = {
    "tar_read_error": "skipped: the sample's bytes cannot be read from its shard (tar cut short)",
    "bad_json": "skipped: .json missing, not JSON, or not a valid conversation",
    "media_mismatch": "skipped: placeholders in the text do not match the media parts",
    "corrupt_video": "skipped: the video cannot be opened or a sampled frame cannot be decoded",
    "corrupt_image": "skipped: an image cannot be decoded",
    "short_video": "kept: the video has fewer frames than asked; every frame is used",
    "too_long": "skipped: text + frames × tokens_per_frame exceeds max_seq_length",
    "error": "skipped: any other exception while loading or encoding (logged with traceback)",
}
ISSUE_KINDS = tuple(ISSUES)


class SampleIssues:
    """Shared counters per issue kind; see :data:`ISSUES`."""

    def __init__(self) -> None:
        ctx = multiprocessing.get_context("fork")
        self._counts = ctx.RawArray(ctypes.c_int64, len(ISSUE_KINDS))
        self._lock = ctx.Lock()
        self._logged: set[tuple[str, str]] = set()  # per process

    def record(self, kind: str, key: str, detail: str, exc_info: Any = None) -> None:
        """Count one occurrence of ``kind`` for sample ``key``; log it the first time this
        process sees that (kind, key)."""
        index = ISSUE_KINDS.index(kind)
        with self._lock:
            self._counts[index] += 1
        if (kind, key) in self._logged:
            return
        self._logged.add((kind, key))
        level = logging.INFO if ISSUES[kind].startswith("kept") else logging.WARNING
        logger.log(level, "sample %s: %s (%s)", key, kind, detail, exc_info=exc_info)

    def skip(self, kind: str, key: str, detail: str) -> NoReturn:
        """Record and skip the current sample (Energon drops it silently)."""
        self.record(kind, key, detail)
        raise SkipSample(f"{kind}: {detail}")

    def counts(self) -> dict[str, int]:
        with self._lock:
            return {kind: int(self._counts[i]) for i, kind in enumerate(ISSUE_KINDS)}

    def handle_error(self, exc: Exception, sample: Any, sources: Any = None) -> None:
        """Energon ``global_error_handler``: an unexpected exception skipped a sample."""
        detail = "".join(traceback.format_exception_only(type(exc), exc)).strip()
        self.record("error", sample_key(sample), detail, exc_info=exc)


def sample_key(sample: Any) -> str:
    """Best-effort key of an Energon sample, crude dict, list of samples or our samples."""
    if isinstance(sample, (list, tuple)):
        return ",".join(sample_key(s) for s in sample) or "?"
    if isinstance(sample, dict):
        return str(sample.get("__key__", "?"))
    return str(getattr(sample, "__key__", getattr(sample, "key", "?")))
