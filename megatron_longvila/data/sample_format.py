"""The layout of one sample in a shard, shared by the shard writer and the task encoder.

A sample is the tar members ``<key>.<part>``:

* ``json``: the conversation, either a list of turns ``[{"from": "human", "value": ...},
  {"from": "gpt", "value": ...}]`` or an object ``{"conversations": [...], ...metadata}``.
* media: ``<ext>`` for a single item, ``<i>.<ext>`` for several (ordered by ``i``); videos
  ``mp4 mkv webm avi mov``, images ``jpg jpeg png webp bmp``. Other parts are ignored.
* no media part: a text-only sample.

The ``<video>``/``<image>`` placeholders in the text, in order, name the media items in order.
A conversation without placeholders gets one line per item (``<video>\\n``...) prepended to its
first user turn.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence

from megatron_longvila.data.chat_template import ConversationError
from megatron_longvila.data.tokenizer import IMAGE_TOKEN, MEDIA_TOKENS, VIDEO_TOKEN

VIDEO_EXTENSIONS = ("mp4", "mkv", "webm", "avi", "mov")
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp")
_PLACEHOLDER_RE = re.compile(f"{re.escape(IMAGE_TOKEN)}|{re.escape(VIDEO_TOKEN)}")
_KIND_OF_TOKEN = {token: kind for kind, token in MEDIA_TOKENS.items()}


def media_kind(ext: str) -> str | None:
    ext = ext.lower()
    return "video" if ext in VIDEO_EXTENSIONS else "image" if ext in IMAGE_EXTENSIONS else None


def ordered_media_parts(parts: dict) -> list[tuple[str, str, bytes]]:
    """(kind, ext, bytes) of the media parts of a raw sample, in placeholder order."""
    found = []
    for part, data in parts.items():
        if part.startswith("__") or not isinstance(data, bytes):
            continue
        prefix, _, ext = part.rpartition(".")
        kind = media_kind(ext)
        if kind is not None:
            order = int(prefix) if prefix.isdigit() else -1
            found.append((order, part, (kind, ext.lower(), data)))
    return [item for _, _, item in sorted(found, key=lambda f: (f[0], f[1]))]


def conversation_from_json(raw: bytes) -> list:
    """The turns of a sample's ``.json`` part (list form or ``{"conversations": ...}``)."""
    meta = json.loads(raw)
    if isinstance(meta, dict):
        if "conversations" not in meta:
            raise ConversationError(f"JSON object without 'conversations' (keys: {sorted(meta)})")
        return meta["conversations"]
    return meta


def placeholder_sequence(turns: Sequence[dict]) -> list[str]:
    """Media kinds of the placeholders in the turns' texts, in order."""
    kinds = []
    for turn in turns:
        text = turn.get("value", turn.get("content", "")) if isinstance(turn, dict) else ""
        if isinstance(text, str):
            kinds += [_KIND_OF_TOKEN[m] for m in _PLACEHOLDER_RE.findall(text)]
    return kinds


def with_placeholders(turns: Sequence[dict], kinds: Sequence[str]) -> list[dict]:
    """A copy of ``turns`` with one placeholder line per media kind prepended to the first
    user turn."""
    turns = [dict(t) for t in turns]
    for turn in turns:
        if turn.get("from", turn.get("role")) in ("human", "user"):
            field = "value" if "value" in turn else "content"
            turn[field] = "".join(MEDIA_TOKENS[k] + "\n" for k in kinds) + turn[field]
            return turns
    raise ConversationError("conversation has no user turn to attach the media to")
