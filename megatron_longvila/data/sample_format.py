"""The layout of one sample in a shard, shared by the shard writer and the task encoder.

A sample is the tar members ``<key>.<part>``:

* ``json``: the conversation, either a list of turns ``[{"from": "human", "value": ...},
  {"from": "gpt", "value": ...}]`` or an object ``{"conversations": [...], ...metadata}``.
* or a caption sample, video2dataset's (and img2dataset's) layout: ``txt`` holds the caption
  (UTF-8) and ``json``, if present, only metadata. It becomes the one-turn conversation
  ``[human: <caption prompt>, gpt: <caption>]`` (the prompt is ``DataConfig.caption_prompt``).
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


def sample_conversation(parts: dict, caption_prompt: str) -> list:
    """The turns of a raw sample: its ``.json`` conversation (list form or ``{"conversations":
    ...}``), else, with a ``.txt`` caption, the caption's one-turn conversation.

    Raises ``ConversationError`` (no conversation, empty or undecodable caption) or
    ``ValueError`` (``.json`` not JSON).
    """
    meta = json.loads(parts["json"]) if "json" in parts else None
    if isinstance(meta, dict) and "conversations" in meta:
        return meta["conversations"]
    if meta is not None and not isinstance(meta, dict):
        return meta
    if "txt" in parts:
        return caption_conversation(parts["txt"], caption_prompt)
    if meta is None:
        names = sorted(k for k in parts if not k.startswith("__"))
        raise ConversationError(f"no .json conversation and no .txt caption (parts: {names})")
    raise ConversationError(
        f"JSON object without 'conversations' (keys: {sorted(meta)}) and no .txt caption"
    )


def caption_conversation(caption: bytes | str, prompt: str) -> list[dict]:
    """``[human: prompt, gpt: caption]``; the media placeholders are added like any other
    conversation's (see the module docstring)."""
    if isinstance(caption, bytes):
        try:
            caption = caption.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ConversationError(f".txt caption is not UTF-8: {exc}") from None
    caption = caption.strip()
    if not caption:
        raise ConversationError(".txt caption is empty")
    return [{"from": "human", "value": prompt}, {"from": "gpt", "value": caption}]


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
