"""Text generators for the summary and the question-answer pairs: prompt -> text.

Any object with a ``generate`` method of the :class:`TextGenerator` signature works. Shipped:
:class:`HFTextGenerator`, a local Hugging Face causal LM folder (``AutoModelForCausalLM`` +
``AutoTokenizer``). The prompt becomes one user message through the tokenizer's chat template
when it has one, else it is used as plain text; decoding follows the folder's
``generation_config.json``.
"""

from __future__ import annotations

from typing import Protocol

import torch

from megatron_longvila.core.platform import dtype_from_name


class TextGenerator(Protocol):
    def generate(self, prompt: str, max_new_tokens: int) -> str:
        """The model's reply to ``prompt`` (without the prompt)."""
        ...


class HFTextGenerator:
    """A local Hugging Face causal language model folder as text generator."""

    def __init__(self, folder: str, device: str = "cpu", dtype: str | None = None) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        self.model = AutoModelForCausalLM.from_pretrained(
            folder, local_files_only=True, dtype=dtype_from_name(dtype)
        )
        self.model.to(device).eval()
        self.device = device

    def generate(self, prompt: str, max_new_tokens: int) -> str:
        templated = self.tokenizer.chat_template is not None
        if templated:
            prompt = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
            )
        # A chat template writes the BOS it wants itself; plain text gets the tokenizer's.
        inputs = self.tokenizer(prompt, return_tensors="pt", add_special_tokens=not templated)
        inputs = inputs.to(self.device)
        with torch.inference_mode():
            out = self.model.generate(**inputs, max_new_tokens=max_new_tokens)
        new_tokens = out[0, inputs["input_ids"].shape[1] :]
        return self.tokenizer.decode(new_tokens, skip_special_tokens=True).strip()
