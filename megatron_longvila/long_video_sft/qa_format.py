"""The text that passes between the stages: clip captions listed for the prompts, and the
question-answer pairs parsed from the text model's output.

QA format asked for by ``qa.txt``: a line ``Q: <question>`` followed by a line
``A: <answer>``, repeated. The parser also accepts ``Question:``/``Answer:``, any case,
numbering (``1. Q:``, ``Q1:``), list bullets and markdown bold around the marker, and answers
running over several lines. A question without an answer is dropped; text before the first
question is ignored. No pair at all is a parse failure, which the builder records.
"""

from __future__ import annotations

import re

_MARKER_RE = re.compile(
    r"^[\s>*#-]*(?:\d+\s*[.)]\s*)?\**\s*(q|question|a|answer)\s*\d*\s*\**\s*[:：]\s*\**\s*(.*)$",
    re.IGNORECASE,
)


def format_captions(spans: list[tuple[float, float]], captions: list[str]) -> str:
    """One line per clip: ``[12.0s-20.5s] caption``."""
    return "\n".join(
        f"[{start:.1f}s-{end:.1f}s] {' '.join(caption.split())}"
        for (start, end), caption in zip(spans, captions, strict=True)
    )


def parse_qa_pairs(text: str, limit: int | None = None) -> list[tuple[str, str]]:
    """(question, answer) pairs in order of the text, at most ``limit``; see module doc."""
    pairs: list[tuple[str, str]] = []
    question: list[str] | None = None
    answer: list[str] | None = None

    def flush() -> None:
        if question is not None and answer is not None:
            q, a = " ".join(question).strip(), " ".join(answer).strip()
            if q and a:
                pairs.append((q, a))

    for line in text.splitlines():
        match = _MARKER_RE.match(line)
        if match is None:  # a continuation line of the current question or answer
            current = answer if answer is not None else question
            if current is not None and line.strip():
                current.append(line.strip())
            continue
        kind, rest = match.group(1).lower(), match.group(2).strip().rstrip("*").strip()
        if kind in ("q", "question"):
            flush()
            question, answer = [rest], None
        elif question is not None and answer is None:
            answer = [rest]
    flush()
    return pairs[:limit] if limit is not None else pairs
