"""Chat templates (qwen2, llama3) rendered straight to token ids, with the assistant's spans known.

A conversation is rendered as a list of segments: template markers (one special-token id each),
plain text (role names, newlines) and message contents. Contents are tokenized piecewise, so the
labels can be set exactly: the assistant's content and its end-of-turn marker carry labels,
everything else is ``IGNORE_INDEX``. ``<image>`` / ``<video>`` in a content become their single
placeholder ids.

qwen2:  ``<|im_start|>{role}\\n{content}<|im_end|>\\n`` per message, with the default system
        prompt "You are a helpful assistant." when the conversation has none.
llama3: ``<|begin_of_text|>`` then ``<|start_header_id|>{role}<|end_header_id|>\\n\\n{content}
        <|eot_id|>`` per message, contents stripped of surrounding whitespace.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from megatron_longvila.data.batch import IGNORE_INDEX
from megatron_longvila.data.tokenizer import IMAGE_TOKEN, VIDEO_TOKEN, TextTokenizer

ROLE_ALIASES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
}
_PLACEHOLDER_RE = re.compile(f"({re.escape(IMAGE_TOKEN)}|{re.escape(VIDEO_TOKEN)})")


class ConversationError(ValueError):
    """A conversation that cannot be rendered (bad roles, empty, no assistant reply)."""


@dataclass(frozen=True)
class ChatTemplate:
    """The pieces of one chat format; see the module docstring for the two we ship."""

    name: str
    bos: str | None
    turn_start: str
    header_end: str | None  # special token closing the role header (llama3), if any
    header_text_end: str  # plain text after the header ("\n" or "\n\n")
    turn_end: str
    after_turn: str  # plain text after the end-of-turn marker
    default_system: str | None
    strip_content: bool

    @property
    def markers(self) -> list[str]:
        """Special tokens this template needs as single ids."""
        found = [self.bos, self.turn_start, self.header_end, self.turn_end]
        return [m for m in found if m is not None]


TEMPLATES = {
    "qwen2": ChatTemplate(
        name="qwen2",
        bos=None,
        turn_start="<|im_start|>",
        header_end=None,
        header_text_end="\n",
        turn_end="<|im_end|>",
        after_turn="\n",
        default_system="You are a helpful assistant.",
        strip_content=False,
    ),
    "llama3": ChatTemplate(
        name="llama3",
        bos="<|begin_of_text|>",
        turn_start="<|start_header_id|>",
        header_end="<|end_header_id|>",
        header_text_end="\n\n",
        turn_end="<|eot_id|>",
        after_turn="",
        default_system=None,
        strip_content=True,
    ),
}


def get_template(name: str) -> ChatTemplate:
    try:
        return TEMPLATES[name]
    except KeyError:
        raise ValueError(f"unknown chat template {name!r}; known: {sorted(TEMPLATES)}") from None


def all_template_markers() -> list[str]:
    return list(dict.fromkeys(m for t in TEMPLATES.values() for m in t.markers))


def normalize_conversation(turns: Sequence[dict]) -> list[tuple[str, str]]:
    """``[{"from": "human", "value": ...}, ...]`` (or ``role``/``content``) -> [(role, text)].

    Roles become system/user/assistant; a system message may only come first; at least one
    assistant reply is required.
    """
    if not isinstance(turns, (list, tuple)) or not turns:
        raise ConversationError(
            f"conversation must be a non-empty list, got {type(turns).__name__}"
        )
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise ConversationError(f"turn {i} is a {type(turn).__name__}, not an object")
        role = turn.get("from", turn.get("role"))
        text = turn.get("value", turn.get("content"))
        if role not in ROLE_ALIASES:
            raise ConversationError(f"turn {i} has unknown role {role!r}")
        if not isinstance(text, str):
            raise ConversationError(f"turn {i} ({role}) has no text")
        role = ROLE_ALIASES[role]
        if role == "system" and i != 0:
            raise ConversationError(f"system message at turn {i}; only turn 0 may be system")
        messages.append((role, text))
    if not any(role == "assistant" for role, _ in messages):
        raise ConversationError("conversation has no assistant reply")
    return messages


def _content_ids(text: str, tokenizer: TextTokenizer) -> list[int]:
    ids: list[int] = []
    for piece in _PLACEHOLDER_RE.split(text):
        if piece in (IMAGE_TOKEN, VIDEO_TOKEN):
            ids.append(tokenizer.special_id(piece))
        elif piece:
            ids.extend(tokenizer.encode(piece))
    return ids


def _turn_ids(
    template: ChatTemplate, tokenizer: TextTokenizer, role: str, content: str | None
) -> tuple[list[int], list[int], list[int]]:
    """(header ids, body ids, trailer ids) of one turn; ``content=None`` renders only the header
    (generation prompt). The body is the content plus the end-of-turn marker."""
    header = [tokenizer.special_id(template.turn_start), *tokenizer.encode(role)]
    if template.header_end is not None:
        header.append(tokenizer.special_id(template.header_end))
    header += tokenizer.encode(template.header_text_end)
    if content is None:
        return header, [], []
    if template.strip_content:
        content = content.strip()
    body = [*_content_ids(content, tokenizer), tokenizer.special_id(template.turn_end)]
    return header, body, tokenizer.encode(template.after_turn)


def _with_system(
    template: ChatTemplate, messages: list[tuple[str, str]], system_prompt: str | None
) -> list[tuple[str, str]]:
    if messages[0][0] == "system":
        return messages
    system = system_prompt if system_prompt is not None else template.default_system
    return [("system", system), *messages] if system is not None else messages


def tokenize_conversation(
    turns: Sequence[dict],
    tokenizer: TextTokenizer,
    template: ChatTemplate,
    system_prompt: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Render a conversation; return (input_ids [s], labels [s]) as int64.

    labels equal input_ids on the assistant's content and end-of-turn marker, IGNORE_INDEX
    elsewhere (aligned, not shifted).
    """
    messages = _with_system(template, normalize_conversation(turns), system_prompt)
    ids: list[int] = []
    labels: list[int] = []
    if template.bos is not None:
        ids.append(tokenizer.special_id(template.bos))
        labels.append(IGNORE_INDEX)
    for role, content in messages:
        header, body, trailer = _turn_ids(template, tokenizer, role, content)
        ids += header + body + trailer
        labels += [IGNORE_INDEX] * len(header)
        labels += body if role == "assistant" else [IGNORE_INDEX] * len(body)
        labels += [IGNORE_INDEX] * len(trailer)
    return torch.tensor(ids, dtype=torch.long), torch.tensor(labels, dtype=torch.long)


def tokenize_prompt(
    turns: Sequence[dict],
    tokenizer: TextTokenizer,
    template: ChatTemplate,
    system_prompt: str | None = None,
) -> torch.Tensor:
    """Token ids [s] of a prompt for generation: the conversation so far (ending with a user
    turn) followed by the assistant's header."""
    if not turns:
        raise ConversationError("prompt needs at least one user message")
    messages = [(ROLE_ALIASES.get(t.get("from", t.get("role"))), t) for t in turns]
    if any(role is None for role, _ in messages):
        raise ConversationError(f"unknown role in prompt turns {turns}")
    rendered = _with_system(
        template,
        [(role, t.get("value", t.get("content"))) for role, t in messages],
        system_prompt,
    )
    ids = [] if template.bos is None else [tokenizer.special_id(template.bos)]
    for role, content in rendered:
        header, body, trailer = _turn_ids(template, tokenizer, role, content)
        ids += header + body + trailer
    ids += _turn_ids(template, tokenizer, "assistant", None)[0]
    return torch.tensor(ids, dtype=torch.long)


def count_placeholders(turns: Sequence[dict]) -> dict[str, int]:
    """How many ``<image>`` and ``<video>`` placeholders the conversation's texts contain."""
    counts = {"image": 0, "video": 0}
    for turn in turns:
        text = turn.get("value", turn.get("content", "")) if isinstance(turn, dict) else ""
        if isinstance(text, str):
            counts["image"] += text.count(IMAGE_TOKEN)
            counts["video"] += text.count(VIDEO_TOKEN)
    return counts
