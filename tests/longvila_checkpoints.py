"""A tiny LongVILA model saved as the trainer saves it, for tests that load checkpoints.

The vocabulary is a locally trained tokenizer's; ``CheckpointManager`` writes the state under
``model`` and records in ``train_state.json`` what the trainer records besides its whole config:
the resolved architecture, tokenizer path, chat template and frames per video.
"""

from __future__ import annotations

CHAT_TEMPLATE = "qwen2"


def tiny_longvila_config(tokenizer):
    from megatron_longvila.models.config import LLMConfig, LongVILAConfig

    tiny = LongVILAConfig.preset("tiny")
    return LongVILAConfig(
        vision=tiny.vision,
        llm=LLMConfig.preset("tiny", vocab_size=tokenizer.vocab_size),
        image_token_id=tokenizer.image_id,
        video_token_id=tokenizer.video_id,
    )


def save_tiny_longvila_checkpoint(root: str, tokenizer_dir: str, iteration: int = 3):
    """Build the tiny model (wide random init, so answers depend on the frames) and save it
    under the checkpoint root ``root``; every rank calls it. Returns (model, config, tokenizer)."""
    from megatron_longvila.checkpoint.manager import CheckpointManager
    from megatron_longvila.checkpoint.train_state import (
        CHAT_TEMPLATE_KEY,
        FRAMES_KEY,
        MODEL_CONFIG_KEY,
        TOKENIZER_KEY,
    )
    from megatron_longvila.data.chat_template import all_template_markers
    from megatron_longvila.data.tokenizer import load_tokenizer
    from megatron_longvila.models.longvila_step import build_longvila_model

    tokenizer = load_tokenizer(tokenizer_dir, all_template_markers())
    cfg = tiny_longvila_config(tokenizer)
    (model,) = build_longvila_model(cfg, transformer_overrides={"init_method_std": 0.2})
    train_state = {
        "config": {"model": {"preset": "tiny"}},
        MODEL_CONFIG_KEY: cfg.to_dict(),
        TOKENIZER_KEY: str(tokenizer_dir),
        CHAT_TEMPLATE_KEY: CHAT_TEMPLATE,
        FRAMES_KEY: 24,
    }
    CheckpointManager(root).save(iteration, {"model": model.sharded_state_dict()}, train_state)
    return model, cfg, tokenizer
