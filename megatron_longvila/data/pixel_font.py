"""A 5×7 pixel font (digits, capital letters, a few signs) drawn into numpy images.

Used to burn needle answers into synthetic video frames, with no font files.
"""

from __future__ import annotations

import numpy as np

GLYPH_HEIGHT, GLYPH_WIDTH = 7, 5

_GLYPHS = {
    "0": ".###. #...# #..## #.#.# ##..# #...# .###.",
    "1": "..#.. .##.. ..#.. ..#.. ..#.. ..#.. .###.",
    "2": ".###. #...# ....# ...#. ..#.. .#... #####",
    "3": "##### ...#. ..#.. ...#. ....# #...# .###.",
    "4": "...#. ..##. .#.#. #..#. ##### ...#. ...#.",
    "5": "##### #.... ####. ....# ....# #...# .###.",
    "6": "..##. .#... #.... ####. #...# #...# .###.",
    "7": "##### ....# ...#. ..#.. .#... .#... .#...",
    "8": ".###. #...# #...# .###. #...# #...# .###.",
    "9": ".###. #...# #...# .#### ....# ...#. .##..",
    "A": ".###. #...# #...# ##### #...# #...# #...#",
    "B": "####. #...# #...# ####. #...# #...# ####.",
    "C": ".###. #...# #.... #.... #.... #...# .###.",
    "D": "###.. #..#. #...# #...# #...# #..#. ###..",
    "E": "##### #.... #.... ####. #.... #.... #####",
    "F": "##### #.... #.... ####. #.... #.... #....",
    "G": ".###. #...# #.... #.### #...# #...# .####",
    "H": "#...# #...# #...# ##### #...# #...# #...#",
    "I": ".###. ..#.. ..#.. ..#.. ..#.. ..#.. .###.",
    "J": "..### ...#. ...#. ...#. ...#. #..#. .##..",
    "K": "#...# #..#. #.#.. ##... #.#.. #..#. #...#",
    "L": "#.... #.... #.... #.... #.... #.... #####",
    "M": "#...# ##.## #.#.# #.#.# #...# #...# #...#",
    "N": "#...# #...# ##..# #.#.# #..## #...# #...#",
    "O": ".###. #...# #...# #...# #...# #...# .###.",
    "P": "####. #...# #...# ####. #.... #.... #....",
    "Q": ".###. #...# #...# #...# #.#.# #..#. .##.#",
    "R": "####. #...# #...# ####. #.#.. #..#. #...#",
    "S": ".#### #.... #.... .###. ....# ....# ####.",
    "T": "##### ..#.. ..#.. ..#.. ..#.. ..#.. ..#..",
    "U": "#...# #...# #...# #...# #...# #...# .###.",
    "V": "#...# #...# #...# #...# #...# .#.#. ..#..",
    "W": "#...# #...# #...# #.#.# #.#.# #.#.# .#.#.",
    "X": "#...# #...# .#.#. ..#.. .#.#. #...# #...#",
    "Y": "#...# #...# .#.#. ..#.. ..#.. ..#.. ..#..",
    "Z": "##### ....# ...#. ..#.. .#... #.... #####",
    " ": "..... ..... ..... ..... ..... ..... .....",
    "-": "..... ..... ..... ##### ..... ..... .....",
    ".": "..... ..... ..... ..... ..... .##.. .##..",
    "?": ".###. #...# ....# ...#. ..#.. ..... ..#..",
    "!": "..#.. ..#.. ..#.. ..#.. ..#.. ..... ..#..",
}


def glyph(char: str) -> np.ndarray:
    """bool [7, 5] bitmap of one character (case-insensitive); rows are space-separated."""
    try:
        rows = _GLYPHS[char.upper()]
    except KeyError:
        raise ValueError(
            f"character {char!r} is not in the pixel font ({''.join(sorted(_GLYPHS))})"
        ) from None
    return np.array([[c == "#" for c in row] for row in rows.split()], dtype=bool)


def text_mask(text: str, scale: int = 1, spacing: int = 1) -> np.ndarray:
    """bool [7·scale, (6·len - 1)·scale] bitmap of ``text`` on one line."""
    if not text:
        raise ValueError("text must not be empty")
    columns = []
    for i, char in enumerate(text):
        if i:
            columns.append(np.zeros((GLYPH_HEIGHT, spacing), dtype=bool))
        columns.append(glyph(char))
    mask = np.concatenate(columns, axis=1)
    return mask.repeat(scale, axis=0).repeat(scale, axis=1)


def draw_text_centered(
    image: np.ndarray, text: str, color: tuple[int, int, int], margin: float = 0.1
) -> np.ndarray:
    """Draw ``text`` as large as fits (integer scale) in the centre of ``image`` [h, w, 3]
    uint8, in place; return the bool mask [h, w] of the drawn pixels."""
    h, w = image.shape[:2]
    base = text_mask(text)
    scale = int(min(h * (1 - 2 * margin) / base.shape[0], w * (1 - 2 * margin) / base.shape[1]))
    if scale < 1:
        raise ValueError(f"text {text!r} does not fit a {w}x{h} frame")
    mask = text_mask(text, scale=scale)
    top, left = (h - mask.shape[0]) // 2, (w - mask.shape[1]) // 2
    full = np.zeros((h, w), dtype=bool)
    full[top : top + mask.shape[0], left : left + mask.shape[1]] = mask
    image[full] = color
    return full
