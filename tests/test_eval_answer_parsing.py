"""The option-letter parser reads the usual answer forms; reference: the letter a person reads
in each answer (hand-labelled below), None where the answer names no option or several."""

from __future__ import annotations

import pytest

from megatron_longvila.eval.answer_parsing import parse_choice, strip_option_label

OPTIONS = ["A. a red square", "B. a blue circle", "C. a dark red square", "D. nothing moves"]

CASES = [
    ("B", "B"),
    ("b", "B"),
    ("(B)", "B"),
    ("[C]", "C"),
    ("B.", "B"),
    ("D:", "D"),
    ("**C**", "C"),
    ("  c)  ", "C"),
    ("The answer is B", "B"),
    ("The best answer is: (C) a dark red square", "C"),
    ("Answer: b) a blue circle", "B"),
    ("answer:D", "D"),
    ("Option A, because the square is red.", "A"),
    ("B. a blue circle", "B"),
    ("b) the circle", "B"),
    ("a blue circle", "B"),
    ("I saw a dark red square.", "C"),  # "a red square" is inside it: the longer text wins
    ("Nothing moves.", "D"),
    ("I think it is C.", "C"),
    ("C is correct", "C"),
    ("A red square moves across.", "A"),  # by option text; the leading "A" is the article
    ("E", None),
    ("I do not know.", None),
    ("A or B", None),
    ("", None),
    ("A large green triangle", None),
]


@pytest.mark.parametrize(("answer", "letter"), CASES)
def test_parse_choice(answer: str, letter: str | None) -> None:
    assert parse_choice(answer, OPTIONS) == letter


def test_options_without_labels_and_more_letters() -> None:
    options = ["cat", "dog", "bird", "fish", "horse"]
    assert parse_choice("E", options) == "E"
    assert parse_choice("the horse", options) == "E"
    assert parse_choice("F", options) is None
    assert strip_option_label("(A) cat") == "cat"
    assert strip_option_label("A cat") == "A cat"  # no label: an article stays
