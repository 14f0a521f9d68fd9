"""Text tokenizers: a Hugging Face tokenizer folder or a sentencepiece ``.model`` file.

Both are wrapped in :class:`TextTokenizer`, which encodes plain text (never adding BOS/EOS by
itself) and gives every special token the pipeline needs exactly one id: the media placeholders
``<image>`` / ``<video>``, the pad token, and the chat template's markers. Tokens missing from
the tokenizer are added (HF) or appended after the vocabulary (sentencepiece), so
``vocab_size`` may grow; the model must size its embedding with it.

:func:`build_tiny_tokenizer` trains a small byte-level BPE locally for tests and the demo.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

IMAGE_TOKEN = "<image>"
VIDEO_TOKEN = "<video>"
PAD_TOKEN = "<pad>"
MEDIA_TOKENS = {"image": IMAGE_TOKEN, "video": VIDEO_TOKEN}
#: Files that hold a Hugging Face tokenizer's vocabulary. A folder with none of them has no
#: tokenizer: transformers 5 would load an empty one (from config.json alone), whose first added
#: tokens then take ids of real vocabulary tokens.
VOCABULARY_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "spiece.model",
    "sentencepiece.bpe.model",
)


def has_vocabulary(folder: str | Path) -> bool:
    """Whether ``folder`` holds a Hugging Face tokenizer's vocabulary (:data:`VOCABULARY_FILES`)."""
    return any((Path(folder) / name).is_file() for name in VOCABULARY_FILES)


class TextTokenizer:
    """What the pipeline needs of a tokenizer; see :func:`load_tokenizer`."""

    vocab_size: int
    pad_id: int

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, without BOS/EOS or other added tokens."""
        raise NotImplementedError

    def decode(self, ids: Sequence[int]) -> str:
        raise NotImplementedError

    def special_id(self, token: str) -> int:
        """The single id of a special token registered at load time."""
        try:
            return self._special_ids[token]
        except KeyError:
            raise KeyError(
                f"{token!r} is not a registered special token; registered: "
                f"{sorted(self._special_ids)}"
            ) from None

    @property
    def image_id(self) -> int:
        return self.special_id(IMAGE_TOKEN)

    @property
    def video_id(self) -> int:
        return self.special_id(VIDEO_TOKEN)

    _special_ids: dict[str, int]


class HFTokenizer(TextTokenizer):
    """A Hugging Face tokenizer loaded from a local folder (``AutoTokenizer``)."""

    def __init__(self, folder: str | Path, special_tokens: Iterable[str]) -> None:
        from tokenizers import AddedToken
        from transformers import AutoTokenizer

        if not has_vocabulary(folder):
            raise ValueError(
                f"no usable tokenizer in {folder}: it has none of {', '.join(VOCABULARY_FILES)}"
            )
        self.hf = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        wanted = list(dict.fromkeys([IMAGE_TOKEN, VIDEO_TOKEN, *special_tokens]))
        vocab = self.hf.get_vocab()
        if len(vocab) <= len(self.hf.all_special_tokens):
            raise ValueError(
                f"no usable tokenizer in {folder}: it loads with {len(vocab)} tokens, special "
                "tokens only"
            )
        missing = [t for t in wanted if t not in vocab]
        if missing:
            self.hf.add_tokens([AddedToken(t, special=True, normalized=False) for t in missing])
        if self.hf.pad_token is None:
            if PAD_TOKEN not in self.hf.get_vocab():
                self.hf.add_tokens([AddedToken(PAD_TOKEN, special=True, normalized=False)])
            self.hf.pad_token = PAD_TOKEN
        self._special_ids = {}
        for token in wanted:
            ids = self.hf.encode(token, add_special_tokens=False)
            if len(ids) != 1:
                raise ValueError(f"special token {token!r} encodes to {len(ids)} ids {ids}, not 1")
            self._special_ids[token] = ids[0]
        self.pad_id = int(self.hf.pad_token_id)
        self.vocab_size = len(self.hf)

    def encode(self, text: str) -> list[int]:
        return list(self.hf.encode(text, add_special_tokens=False)) if text else []

    def decode(self, ids: Sequence[int]) -> str:
        return self.hf.decode(list(ids))


class SentencePieceTokenizer(TextTokenizer):
    """A sentencepiece model; special tokens it lacks get ids after its vocabulary."""

    def __init__(self, model_file: str | Path, special_tokens: Iterable[str]) -> None:
        import sentencepiece

        self.sp = sentencepiece.SentencePieceProcessor(model_file=str(model_file))
        base = self.sp.get_piece_size()
        self._special_ids = {}
        self._appended: dict[int, str] = {}
        wanted = list(dict.fromkeys([IMAGE_TOKEN, VIDEO_TOKEN, *special_tokens]))
        has_pad = self.sp.pad_id() >= 0
        if not has_pad:
            wanted.append(PAD_TOKEN)
        for token in wanted:
            piece_id = self.sp.piece_to_id(token)
            if piece_id == self.sp.unk_id() and token != self.sp.id_to_piece(piece_id):
                piece_id = base + len(self._appended)
                self._appended[piece_id] = token
            self._special_ids[token] = piece_id
        self.pad_id = self.sp.pad_id() if has_pad else self._special_ids[PAD_TOKEN]
        self.vocab_size = base + len(self._appended)

    def encode(self, text: str) -> list[int]:
        return list(self.sp.encode(text)) if text else []

    def decode(self, ids: Sequence[int]) -> str:
        out, run = [], []
        for i in ids:
            if i in self._appended:
                out.append(self.sp.decode(run))
                out.append(self._appended[i])
                run = []
            else:
                run.append(int(i))
        out.append(self.sp.decode(run))
        return "".join(out)


def load_tokenizer(path: str | Path, special_tokens: Iterable[str] = ()) -> TextTokenizer:
    """A HF tokenizer folder or a sentencepiece ``.model`` file, with ``<image>``, ``<video>``,
    a pad token and ``special_tokens`` (e.g. the chat template's markers) as single ids."""
    path = Path(path)
    if path.is_dir():
        return HFTokenizer(path, special_tokens)
    if path.is_file() and path.suffix == ".model":
        return SentencePieceTokenizer(path, special_tokens)
    raise FileNotFoundError(
        f"tokenizer {path} is neither a Hugging Face tokenizer folder nor a sentencepiece "
        ".model file"
    )
