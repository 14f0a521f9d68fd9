"""Model configs: validation names the class, field and value; presets; dicts from YAML."""

from __future__ import annotations

import pytest

from megatron_longvila.models.config import (
    LLM_PRESETS,
    LONGVILA_PRESETS,
    VISION_PRESETS,
    ConfigError,
    LLMConfig,
    LongVILAConfig,
    RopeScaling,
    VisionConfig,
)


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: VisionConfig(hidden_size=100, num_heads=16), "VisionConfig.hidden_size = 100"),
        (lambda: VisionConfig(select_layer=-28), "VisionConfig.select_layer = -28"),
        (lambda: VisionConfig(select_layer=0), "VisionConfig.select_layer = 0"),
        (lambda: VisionConfig(image_size=10), "VisionConfig.image_size = 10"),
        (lambda: LLMConfig(num_heads=28, num_kv_heads=3), "LLMConfig.num_kv_heads = 3"),
        (lambda: LLMConfig(vocab_size=0), "LLMConfig.vocab_size = 0"),
        (lambda: RopeScaling(kind="dynamic", factor=2.0), "RopeScaling.kind = 'dynamic'"),
        (lambda: RopeScaling(kind="linear", factor=0.5), "RopeScaling.factor = 0.5"),
        (
            lambda: LongVILAConfig.preset("tiny", image_token_id=250),
            r"LongVILAConfig.image_token_id = 250: must be a token id in \[0, 250\)",
        ),
        (
            lambda: LongVILAConfig.preset("tiny", video_token_id=248),
            "LongVILAConfig.video_token_id = 248: must differ",
        ),
        (lambda: LLMConfig.preset("qwen3"), "no preset 'qwen3'"),
        (lambda: LLMConfig.from_dict({"hidden": 8}), r"unknown field\(s\) \['hidden'\]"),
    ],
)
def test_bad_values_are_refused_by_name(build, message):
    with pytest.raises(ConfigError, match=message):
        build()


def test_presets_are_valid_and_independent():
    for presets in (VISION_PRESETS, LLM_PRESETS, LONGVILA_PRESETS):
        for name in presets:
            assert type(presets[name]).preset(name) == presets[name]
    tiny = LongVILAConfig.preset("tiny")
    tiny.vision.num_layers = 99  # changing a copy leaves the preset alone
    assert LongVILAConfig.preset("tiny").vision.num_layers == VISION_PRESETS["tiny"].num_layers


def test_derived_sizes():
    so400m = VisionConfig.preset("siglip-so400m-patch14-384")
    assert (so400m.grid_size, so400m.num_layers_to_run) == (27, 26)
    assert VisionConfig.preset("tiny", select_layer=2).num_layers_to_run == 2
    qwen = LLMConfig.preset("qwen2-7b")
    assert (qwen.kv_channels, qwen.padded_vocab_size) == (128, 152064)
    assert LLMConfig.preset("tiny").padded_vocab_size == 256


def test_dict_round_trip():
    cfg = LongVILAConfig.preset("tiny", llm=LLMConfig.preset("llama3.1-8b"))
    cfg.image_token_id, cfg.video_token_id = 1, 2
    again = LongVILAConfig.from_dict(cfg.to_dict())
    assert again == cfg and isinstance(again.llm.rope_scaling, RopeScaling)
