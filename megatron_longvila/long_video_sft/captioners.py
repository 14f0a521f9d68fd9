"""Clip captioners: frames of one clip + a prompt -> caption text.

Any object with a ``caption`` method of the :class:`Captioner` signature works. A build names
its captioner by a spec string (:func:`load_captioner`), loaded once in every worker process:

* "hf:FOLDER", :class:`HFVisionCaptioner`: a local Hugging Face vision-language model folder
  that ``AutoProcessor`` and ``AutoModelForImageTextToText`` load (LLaVA, Qwen2-VL, Idefics, ...).
  The clip's frames go in as images of one user message, followed by the prompt, rendered with
  the processor's chat template; greedy or sampled decoding follows the folder's
  ``generation_config.json``.
* "py:MODULE:FACTORY", a plug-in: ``MODULE.FACTORY(device=..., dtype=...)`` is called and must
  return a :class:`Captioner` (``MODULE`` importable in the worker processes).
* "longvila:CHECKPOINT", :class:`~.longvila_captioner.LongVILACaptioner`: our own LongVILA
  model from a checkpoint (a trainer's save root, an ``iter_*`` folder, a dist checkpoint or a
  Hugging Face LongVILA folder), one greedy MM-SP generation per clip on a one-rank layout.
"""

from __future__ import annotations

import importlib
from typing import Protocol

import torch

from megatron_longvila.core.platform import dtype_from_name


class Captioner(Protocol):
    """What a captioner implements. A "py:MODULE:FACTORY" plug-in's factory is called as
    ``FACTORY(device=str, dtype=str | None)`` once per worker process and returns one."""

    def caption(self, frames: list[torch.Tensor], prompt: str, max_new_tokens: int) -> str:
        """Caption of a clip. frames: uint8 [3, H, W] each, in time order."""
        ...


class HFVisionCaptioner:
    """A local Hugging Face image-text-to-text model folder as captioner."""

    def __init__(self, folder: str, device: str = "cpu", dtype: str | None = None) -> None:
        from transformers import AutoModelForImageTextToText, AutoProcessor

        self.processor = AutoProcessor.from_pretrained(folder, local_files_only=True)
        if getattr(self.processor, "chat_template", None) is None:
            raise ValueError(
                f"the processor in {folder} has no chat template, so the frames and the prompt "
                "cannot be placed in a message; add chat_template.jinja to the folder"
            )
        self.model = AutoModelForImageTextToText.from_pretrained(
            folder, local_files_only=True, dtype=dtype_from_name(dtype)
        )
        self.model.to(device).eval()
        self.device = device

    def caption(self, frames: list[torch.Tensor], prompt: str, max_new_tokens: int) -> str:
        from PIL import Image

        images = [Image.fromarray(f.permute(1, 2, 0).contiguous().numpy()) for f in frames]
        content = [{"type": "image"} for _ in images] + [{"type": "text", "text": prompt}]
        text = self.processor.apply_chat_template(
            [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
        )
        inputs = self.processor(text=text, images=images, return_tensors="pt")
        inputs = inputs.to(device=self.device, dtype=self.model.dtype)  # casts only pixel floats
        with torch.inference_mode():
            out = self.model.generate(**inputs, max_new_tokens=max_new_tokens)
        new_tokens = out[0, inputs["input_ids"].shape[1] :]
        return self.processor.decode(new_tokens, skip_special_tokens=True).strip()


CAPTIONER_KINDS = ("hf", "py", "longvila")
CAPTIONER_SPECS = "'hf:FOLDER', 'py:MODULE:FACTORY', 'longvila:CHECKPOINT'"


def parse_captioner_spec(spec: str) -> tuple[str, str]:
    """(kind, target) of "hf:FOLDER", "py:MODULE:FACTORY" or "longvila:CHECKPOINT"; raises
    ``ValueError`` for anything else."""
    kind, sep, target = spec.partition(":")
    if not sep or kind not in CAPTIONER_KINDS or not target:
        raise ValueError(f"captioner {spec!r} must be one of {CAPTIONER_SPECS}")
    module, _, factory = target.rpartition(":")
    if kind == "py" and not (module and factory.isidentifier()):
        raise ValueError(f"captioner {spec!r}: a plug-in is named 'py:MODULE:FACTORY'")
    return kind, target


def load_captioner(spec: str, device: str = "cpu", dtype: str | None = None) -> Captioner:
    """The captioner named by ``spec`` (see :func:`parse_captioner_spec`) on ``device``;
    ``dtype`` is a torch dtype name or None for the model's own."""
    kind, target = parse_captioner_spec(spec)
    if kind == "hf":
        return HFVisionCaptioner(target, device=device, dtype=dtype)
    if kind == "longvila":
        # Imported here: megatron-core and the model are needed only by this captioner.
        from megatron_longvila.long_video_sft.longvila_captioner import LongVILACaptioner

        return LongVILACaptioner(target, device=device, dtype=dtype)
    module, _, factory = target.rpartition(":")
    captioner = getattr(importlib.import_module(module), factory)(device=device, dtype=dtype)
    if not callable(getattr(captioner, "caption", None)):
        raise TypeError(
            f"captioner {spec!r} returned a {type(captioner).__name__}, which has no "
            "caption(frames, prompt, max_new_tokens) method"
        )
    return captioner
