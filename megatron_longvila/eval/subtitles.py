"""SubRip (.srt) subtitles: parse cues and pick those shown at given moments."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

_TIME = r"(\d+):(\d{2}):(\d{2})[,.](\d{1,3})"
_CUE_TIMES = re.compile(rf"{_TIME}\s*-->\s*{_TIME}")
_TAGS = re.compile(r"<[^>]+>|\{\\[^}]*\}")  # <i>..</i>, {\an8}


@dataclass(frozen=True)
class Cue:
    start_s: float
    end_s: float
    text: str


def _seconds(h: str, m: str, s: str, ms: str) -> float:
    return int(h) * 3600 + int(m) * 60 + int(s) + int(ms.ljust(3, "0")) / 1000


def parse_srt(text: str) -> list[Cue]:
    """Cues in file order; blocks without a time line are skipped."""
    cues = []
    for block in re.split(r"\n\s*\n", text.replace("\r\n", "\n").strip()):
        lines = block.strip().split("\n")
        for i, line in enumerate(lines):
            times = _CUE_TIMES.search(line)
            if times:
                words = " ".join(_TAGS.sub("", t).strip() for t in lines[i + 1 :]).strip()
                if words:
                    g = times.groups()
                    cues.append(Cue(_seconds(*g[:4]), _seconds(*g[4:]), words))
                break
    return cues


def read_srt(path: str | Path) -> list[Cue]:
    return parse_srt(Path(path).read_text(encoding="utf-8-sig", errors="replace"))


def cues_at(cues: Sequence[Cue], times_s: Sequence[float]) -> list[str]:
    """Texts of the cues on screen at any of ``times_s`` (each once, in file order), as
    VideoMME pairs subtitles with the sampled frames."""
    return [c.text for c in cues if any(c.start_s <= t <= c.end_s for t in times_s)]
