"""Problems found in samples: counted across the loader's worker processes, logged once per key.

Each kind of problem has a documented outcome (see :data:`ISSUES`). The counters live in shared
memory created before Energon forks its workers, so the training process reads the totals of
all its workers; counts cover this process's lifetime (samples replayed after a restore count
again).

A loader whose samples are all skipped would wait forever for a batch. So the skips in a row,
over all workers, are counted too (a sample delivered by post-encoding resets the run): the
``max_consecutive_skips``-th raises :class:`TooManySkipped`, which stops the loader with the
counts and the first example of each kind of issue.
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
    "bad_json": "skipped: no conversation (.json missing, not JSON or not a valid conversation, "
    "and no usable .txt caption)",
    "media_mismatch": "skipped: placeholders in the text do not match the media parts",
    "corrupt_video": "skipped: the video cannot be opened or a sampled frame cannot be decoded",
    "corrupt_image": "skipped: an image cannot be decoded",
    "short_video": "kept: the video has fewer frames than asked; every frame is used",
    "too_long": "skipped: text + frames × tokens_per_frame exceeds max_seq_length",
    "error": "skipped: any other exception while loading or encoding (logged with traceback)",
}
ISSUE_KINDS = tuple(ISSUES)
_EXAMPLE_BYTES = 480  # per kind, in shared memory


class TooManySkipped(RuntimeError):
    """Every one of the last ``max_consecutive_skips`` samples was skipped: the data (or a
    limit such as ``max_seq_length``) leaves nothing to train on."""


class SampleIssues:
    """Shared counters per issue kind; see :data:`ISSUES` and the module docstring.

    ``max_consecutive_skips``: skips in a row that stop the loader (None: never).
    """

    def __init__(self, max_consecutive_skips: int | None = None) -> None:
        ctx = multiprocessing.get_context("fork")
        self._counts = ctx.RawArray(ctypes.c_int64, len(ISSUE_KINDS) + 1)  # last: skips in a row
        self._examples = ctx.RawArray(ctypes.c_char, len(ISSUE_KINDS) * _EXAMPLE_BYTES)
        self._lock = ctx.Lock()
        self._logged: set[tuple[str, str]] = set()  # per process
        self.max_consecutive_skips = max_consecutive_skips

    def record(self, kind: str, key: str, detail: str, exc_info: Any = None) -> None:
        """Count one occurrence of ``kind`` for sample ``key``; log it the first time this
        process sees that (kind, key)."""
        index = ISSUE_KINDS.index(kind)
        kept = ISSUES[kind].startswith("kept")
        with self._lock:
            if self._counts[index] == 0:
                example = f"sample {key}: {detail}".encode()[: _EXAMPLE_BYTES - 1]
                start = index * _EXAMPLE_BYTES
                self._examples[start : start + len(example)] = example
            self._counts[index] += 1
            if not kept:
                self._counts[len(ISSUE_KINDS)] += 1
        if (kind, key) in self._logged:
            return
        self._logged.add((kind, key))
        level = logging.INFO if kept else logging.WARNING
        logger.log(level, "sample %s: %s (%s)", key, kind, detail, exc_info=exc_info)

    def skip(self, kind: str, key: str, detail: str) -> NoReturn:
        """Record and skip the current sample (Energon drops it silently); raise
        :class:`TooManySkipped` instead when it completes a run of ``max_consecutive_skips``."""
        self.record(kind, key, detail)
        self._stop_if_stalled()
        raise SkipSample(f"{kind}: {detail}")

    def delivered(self) -> None:
        """A sample made it through: the run of skips is over."""
        self._counts[len(ISSUE_KINDS)] = 0

    def counts(self) -> dict[str, int]:
        with self._lock:
            return {kind: int(self._counts[i]) for i, kind in enumerate(ISSUE_KINDS)}

    def examples(self) -> dict[str, str]:
        """The first sample recorded for each kind seen: ``"sample KEY: detail"``."""
        with self._lock:
            raw = bytes(self._examples.raw)
        return {
            kind: raw[i * _EXAMPLE_BYTES : (i + 1) * _EXAMPLE_BYTES]
            .rstrip(b"\0")
            .decode(errors="replace")
            for i, kind in enumerate(ISSUE_KINDS)
            if raw[i * _EXAMPLE_BYTES]
        }

    def handle_error(self, exc: Exception, sample: Any, sources: Any = None) -> None:
        """Energon ``global_error_handler``: an unexpected exception skipped a sample.
        :class:`TooManySkipped` passes through, so it stops the loader."""
        if isinstance(exc, TooManySkipped):
            raise exc
        detail = "".join(traceback.format_exception_only(type(exc), exc)).strip()
        self.record("error", sample_key(sample), detail, exc_info=exc)
        self._stop_if_stalled()

    def _stop_if_stalled(self) -> None:
        limit = self.max_consecutive_skips
        run = int(self._counts[len(ISSUE_KINDS)])
        if limit is None or run < limit:
            return
        counts = {kind: n for kind, n in self.counts().items() if n}
        examples = "; ".join(f"{kind}: {text}" for kind, text in self.examples().items())
        raise TooManySkipped(
            f"the last {run} samples were all skipped (data.max_consecutive_skips = {limit}): "
            f"nothing left to train on. Issue counts: {counts}. First example of each: {examples}"
        )


def sample_key(sample: Any) -> str:
    """Best-effort key of an Energon sample, crude dict, list of samples or our samples."""
    if isinstance(sample, (list, tuple)):
        return ",".join(sample_key(s) for s in sample) or "?"
    if isinstance(sample, dict):
        return str(sample.get("__key__", "?"))
    return str(getattr(sample, "__key__", getattr(sample, "key", "?")))
