"""Which option letter a free-form answer to a multiple-choice question names.

Models answer "B", "(B)", "B.", "b) the cat", "The answer is B", "Answer: **C**", or repeat an
option's text without its letter. :func:`parse_choice` tries, in order of confidence:

1. the whole answer is one letter, bracketed or punctuated ("B", "(b)", "[C].");
2. a letter after "answer is/answer:/option/choice" ("The best answer is: (C) ...");
3. a letter opening the answer and followed by ``.``, ``)``, ``:`` or end ("B. text", "b) text");
4. one option's text appearing in the answer (the longest, when one contains another);
5. one capital letter standing alone ("I think C.", "C is right"); "A" followed by a
   lower-case word is read as the article ("A red square moves."), except before "or", "and",
   "is" ("A or B" names two letters, so no answer).

Only letters of the given options count ("E" is no answer to four options).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

LETTERS = "ABCDEFGHIJ"
_OPTION_PREFIX = re.compile(r"^\s*[\(\[]?([A-Ja-j])[\)\]\.:]\s*")
_DECORATION = re.compile(r"[*_`\"']")
_ARTICLE = re.compile(r"\s+(?!(?:or|and|is)\b)[a-z]")


def option_letters(count: int) -> str:
    if not 1 <= count <= len(LETTERS):
        raise ValueError(f"need 1..{len(LETTERS)} options, got {count}")
    return LETTERS[:count]


def strip_option_label(option: str) -> str:
    """'B. a red circle' / '(B) a red circle' -> 'a red circle'."""
    return _OPTION_PREFIX.sub("", option, count=1).strip()


def _normalized(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def _match_option_text(answer: str, options: Sequence[str], letters: str) -> str | None:
    haystack = f" {_normalized(answer)} "
    found = []
    for letter, option in zip(letters, options):
        text = _normalized(strip_option_label(option))
        if text and f" {text} " in haystack:
            found.append((len(text), letter, text))
    if not found:
        return None
    found.sort(reverse=True)
    longest = found[0]
    # Several matches count only when the longest contains all the others ("red" in "dark red").
    if all(text in longest[2] for _, _, text in found[1:]):
        return longest[1]
    return None


def parse_choice(answer: str, options: Sequence[str]) -> str | None:
    """The letter (upper case) of the option ``answer`` names, or None if it names none or
    several. ``options``: the option texts, with or without their "A. " labels."""
    letters = option_letters(len(options))
    valid = f"[{letters}{letters.lower()}]"
    text = _DECORATION.sub("", answer).strip()

    whole = re.fullmatch(rf"[\(\[]?({valid})[\)\]]?[\.:]?", text)
    if whole:
        return whole.group(1).upper()
    cue = re.search(
        rf"(?:answer\s*(?:is)?\s*:?|option|choice)\s*[\(\[]?({valid})(?![A-Za-z])",
        text,
        re.IGNORECASE,
    )
    if cue:
        return cue.group(1).upper()
    leading = re.match(rf"[\(\[]?({valid})(?:[\)\]\.:]|$)", text)
    if leading:
        return leading.group(1).upper()
    by_text = _match_option_text(text, options, letters)
    if by_text:
        return by_text
    alone = {
        m.group(1)
        for m in re.finditer(rf"(?<![A-Za-z])\(?([{letters}])\)?(?![A-Za-z])", text)
        if m.group(1) != "A" or not _ARTICLE.match(text, m.end())
    }
    if len(alone) == 1:
        return alone.pop()
    return None
