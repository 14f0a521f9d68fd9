"""Per-video results in the work folder, so that a restarted build skips finished videos.

``<work>/results/<key>.json`` holds one video's annotation plus what identifies it: the video's
path (relative to the video root) and size, and a fingerprint of the settings, models and
templates that made it. A result counts as finished only if all three still match; it is written
to a temporary file and renamed, so a crash never leaves half a result behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from pathlib import Path

RESULT_FORMAT = "megatron_longvila.long_video_sft.result/1"


def video_key(relative: str) -> str:
    """A sample key for a video path: its path in safe characters plus a short hash of it (so
    ``a/b.mp4`` and ``a_b.mp4`` differ). Only ``[A-Za-z0-9_-]``, as webdataset keys need."""
    readable = re.sub(r"[^A-Za-z0-9_-]", "_", relative)[-80:]
    return f"{readable}-{hashlib.sha1(relative.encode('utf-8')).hexdigest()[:10]}"


def fingerprint(settings: dict) -> str:
    """A short hash of JSON-typed ``settings``."""
    text = json.dumps(settings, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


class ResultCache:
    def __init__(self, work_dir: str | Path) -> None:
        self.folder = Path(work_dir) / "results"
        self.folder.mkdir(parents=True, exist_ok=True)

    def path(self, relative: str) -> Path:
        return self.folder / f"{video_key(relative)}.json"

    def load(self, relative: str) -> dict | None:
        """The stored result of a video, None if there is none or it cannot be read."""
        try:
            result = json.loads(self.path(relative).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return result if isinstance(result, dict) else None

    def finished(self, relative: str, video_bytes: int, settings_fingerprint: str) -> dict | None:
        """The stored result if it was made for this file and these settings, else None."""
        result = self.load(relative)
        wanted = {
            "format": RESULT_FORMAT,
            "video": relative,
            "video_bytes": video_bytes,
            "fingerprint": settings_fingerprint,
        }
        if result is None or any(result.get(k) != v for k, v in wanted.items()):
            return None
        return result

    def save(
        self, relative: str, video_bytes: int, settings_fingerprint: str, result: dict
    ) -> None:
        record = {
            "format": RESULT_FORMAT,
            "video": relative,
            "video_bytes": video_bytes,
            "fingerprint": settings_fingerprint,
            **result,
        }
        target = self.path(relative)
        handle, temporary = tempfile.mkstemp(dir=self.folder, prefix=target.name, suffix=".tmp")
        try:
            with os.fdopen(handle, "w", encoding="utf-8") as f:
                json.dump(record, f, ensure_ascii=False, indent=1)
                f.flush()
                os.fsync(f.fileno())
            os.replace(temporary, target)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
