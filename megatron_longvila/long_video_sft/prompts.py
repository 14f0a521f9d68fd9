"""The editable prompt templates of the builder: ``caption.txt``, ``summary.txt``, ``qa.txt``.

The defaults ship in ``templates/`` next to this file. A folder given by the user overrides
those of the three files it holds. Templates are Python format strings (``{captions}``,
``{duration:.0f}``; write a literal brace as ``{{`` or ``}}``). Fields (``TEMPLATE_FIELDS``):

* ``caption.txt``, one clip: ``start``, ``end`` (seconds), ``duration`` (of the video),
  ``index`` (of the clip, from 0), ``num_clips``.
* ``summary.txt``: ``captions`` (required; one ``[start-end] caption`` line per clip),
  ``duration``, ``num_clips``.
* ``qa.txt``: ``summary`` (required), ``captions``, ``duration``, ``num_clips``,
  ``num_questions``; it must ask for the format :mod:`qa_format` parses.
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

#: Fields each template may use; those in REQUIRED_FIELDS must appear.
TEMPLATE_FIELDS = {
    "caption": {"start", "end", "duration", "index", "num_clips"},
    "summary": {"captions", "duration", "num_clips"},
    "qa": {"summary", "captions", "duration", "num_clips", "num_questions"},
}
REQUIRED_FIELDS = {"caption": set(), "summary": {"captions"}, "qa": {"summary"}}


@dataclass(frozen=True)
class PromptTemplates:
    caption: str
    summary: str
    qa: str

    def render(self, name: str, **fields: object) -> str:
        """The template ``name`` ("caption", "summary" or "qa") filled with ``fields``."""
        return getattr(self, name).format_map(fields)


def template_fields(text: str) -> set[str]:
    """Names of the replacement fields of a format string."""
    return {
        field.split(".")[0].split("[")[0]
        for _, field, _, _ in string.Formatter().parse(text)
        if field is not None
    }


def check_template(name: str, text: str, source: str) -> None:
    try:
        used = template_fields(text)
    except ValueError as exc:
        raise ValueError(f"template {source}: not a valid format string: {exc}") from exc
    unknown = used - TEMPLATE_FIELDS[name]
    missing = REQUIRED_FIELDS[name] - used
    if unknown or missing:
        raise ValueError(
            f"template {source}: unknown fields {sorted(unknown)}, missing fields "
            f"{sorted(missing)}; {name}.txt may use {sorted(TEMPLATE_FIELDS[name])} "
            "(write literal braces as {{ and }})"
        )


def load_templates(folder: str | Path | None = None) -> PromptTemplates:
    """The shipped templates, with those in ``folder`` (if given) taking their place."""
    if folder is not None and not Path(folder).is_dir():
        raise FileNotFoundError(f"template folder {folder} does not exist")
    texts = {}
    shipped = resources.files(__package__) / "templates"
    for name in TEMPLATE_FIELDS:
        path = Path(folder) / f"{name}.txt" if folder is not None else None
        if path is not None and path.is_file():
            text, source = path.read_text(encoding="utf-8"), str(path)
        else:
            text, source = (shipped / f"{name}.txt").read_text(encoding="utf-8"), f"{name}.txt"
        check_template(name, text, source)
        texts[name] = text.strip()
    return PromptTemplates(**texts)
