"""Tiny Hugging Face generation models with random weights, saved as local folders, for the
dataset-builder tests: a LLaVA-style vision-language model with its processor, and a Qwen2
causal LM that either babbles or always answers one fixed text.

The fixed answer is the model's own ``generation_config.json``: a ``sequence_bias`` that raises
each next token of the text (given the ones before it) far above the random logits, so plain
``generate`` on the loaded folder returns exactly that text from any prompt.
"""

from __future__ import annotations

from pathlib import Path

import torch

# qwen2-style chat template; image items of a message become one <image> token each.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}"
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}<image>{% else %}{{ c['text'] }}"
    "{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_chat_tokenizer(tokenizer_dir: Path):
    """The tiny BPE folder made by ``build_tiny_tokenizer``, with a chat template and
    ``<|im_end|>`` as end of sequence."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    tokenizer.eos_token = "<|im_end|>"
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def _text_config(tokenizer):
    from transformers import Qwen2Config

    return Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def save_tiny_vlm(folder: Path, tokenizer_dir: Path, seed: int = 0) -> Path:
    """LlavaForConditionalGeneration (CLIP tower 32×32, patch 8 -> 16 tokens per image, Qwen2
    LM) + LlavaProcessor, saved to ``folder``."""
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    tokenizer = tiny_chat_tokenizer(tokenizer_dir)
    vision = CLIPVisionConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=32,
        patch_size=8,
        projection_dim=16,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=_text_config(tokenizer),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
    )
    torch.manual_seed(seed)
    LlavaForConditionalGeneration(config).save_pretrained(folder)
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(
            size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
        ),
        tokenizer=tokenizer,
        patch_size=8,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's class token, dropped by "default"
        image_token="<image>",
        chat_template=CHAT_TEMPLATE,
    )
    processor.save_pretrained(folder)
    return folder


def save_tiny_text_model(
    folder: Path, tokenizer_dir: Path, forced_reply: str | None = None, seed: int = 1
) -> Path:
    """Qwen2ForCausalLM + tokenizer saved to ``folder``; with ``forced_reply`` its generation
    config makes it answer exactly that text (then end of sequence)."""
    from transformers import GenerationConfig, Qwen2ForCausalLM

    tokenizer = tiny_chat_tokenizer(tokenizer_dir)
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(_text_config(tokenizer))
    generation = {"do_sample": False, "eos_token_id": tokenizer.eos_token_id}
    if forced_reply is not None:
        ids = [*tokenizer.encode(forced_reply, add_special_tokens=False), tokenizer.eos_token_id]
        # The bias grows with the matched prefix, so the longest match always wins.
        generation["sequence_bias"] = [[ids[: i + 1], 20.0 * (i + 1)] for i in range(len(ids))]
    model.generation_config = GenerationConfig(pad_token_id=tokenizer.pad_token_id, **generation)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
