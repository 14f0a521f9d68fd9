"""The trainer's config is checked before any process group starts, naming the field."""

from __future__ import annotations

import pytest

from megatron_longvila.training.config import load_train_config
from megatron_longvila.training.config_io import ConfigError


@pytest.fixture
def stage_yaml(tmp_path):
    (tmp_path / "shards").mkdir()
    (tmp_path / "tok").mkdir()
    path = tmp_path / "stage.yaml"
    path.write_text(
        f"""
run: {{output_dir: {tmp_path}/run, train_steps: 4}}
parallel: {{tp: 1, ulysses: 2, ring: 2}}
model: {{preset: tiny, freeze: [vision_tower], overrides: {{llm: {{rope_theta: 50000.0}}}}}}
data: {{dataset_path: {tmp_path}/shards, tokenizer_path: {tmp_path}/tok, max_seq_length: 256}}
"""
    )
    return path


def test_model_fields_fill_the_data_section(stage_yaml):
    config = load_train_config(stage_yaml, ["optimizer.lr=3e-4"], world_size=4)
    arch = config.architecture()
    assert arch.llm.rope_theta == 50000.0
    assert config.data.image_size == arch.vision.image_size
    assert config.data.tokens_per_frame == arch.tokens_per_frame
    assert config.optimizer.lr == pytest.approx(3e-4)
    assert config.parallel.sp == 4


@pytest.mark.parametrize(
    ("overrides", "world", "message"),
    [
        (["run.train_step=3"], 4, r"unknown config key 'run\.train_step'.*'run\.train_steps'"),
        (["parallel.ring=3"], 4, r"world size 4 is not divisible by tp×ulysses×ring×pp"),
        (["parallel.ulysses=3", "parallel.ring=1"], 3, r"attention heads are not divisible"),
        (["data.dataset_path=/no/such/shards"], 4, r"data\.dataset_path: /no/such/shards"),
        (["data.image_size=999"], 4, r"data\.image_size = 999 disagrees with the model"),
        (["model.freeze=[llm, vision_tower, mm_projector]"], 4, r"nothing would train"),
        (["model.freeze=[decoder]"], 4, r"unknown module\(s\) \['decoder'\]"),
        (
            ["model.overrides={llm: {hiden_size: 8}}"],
            4,
            r"model: .*unknown field\(s\) \['hiden_size'\]",
        ),
        (["init.checkpoint=/no/ckpt"], 4, r"init\.checkpoint: /no/ckpt does not exist"),
        (["data.max_seq_length=6"], 4, r"sequence length 6 is shorter than 2×sp = 2×4 = 8"),
        (["parallel.tp=4", "parallel.ulysses=1", "parallel.ring=1"], 4, r"num_query_groups 2"),
        (
            ["optimizer.warmup_steps=4"],
            4,
            r"warmup_steps = 4 must be smaller than run\.train_steps = 4",
        ),
    ],
)
def test_bad_configs_name_the_field(stage_yaml, overrides, world, message):
    with pytest.raises(ConfigError, match=message):
        load_train_config(stage_yaml, overrides, world_size=world)
