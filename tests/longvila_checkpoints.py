"""A tiny LongVILA model saved as the trainer saves it, for tests that load checkpoints.

The vocabulary is a locally trained tokenizer's; ``CheckpointManager`` writes the state under
``model`` and records the parts of the training config inference reads (model section,
tokenizer path, chat template) in ``train_state.json``; nothing is written for inference.
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
    from megatron_longvila.data.chat_template import all_template_markers
    from megatron_longvila.data.tokenizer import load_tokenizer
    from megatron_longvila.models.longvila_step import build_longvila_model
    from megatron_longvila.training.checkpointing import CheckpointManager

    tokenizer = load_tokenizer(tokenizer_dir, all_template_markers())
    cfg = tiny_longvila_config(tokenizer)
    (model,) = build_longvila_model(cfg, transformer_overrides={"init_method_std": 0.2})
    train_config = {  # the parts of the trainer's recorded config that inference reads
        "model": {"preset": "tiny", "overrides": {"llm": {"vocab_size": tokenizer.vocab_size}}},
        "data": {"tokenizer_path": str(tokenizer_dir), "chat_template": CHAT_TEMPLATE},
    }
    CheckpointManager(root).save(
        iteration, {"model": model.sharded_state_dict()}, {"config": train_config}
    )
    return model, cfg, tokenizer
