"""The trainer's config is checked before any process group starts, naming the field."""

from __future__ import annotations

import json

import pytest

from megatron_longvila.training.config import load_train_config
from megatron_longvila.training.config_io import ConfigError


@pytest.fixture
def stage_yaml(tmp_path):
    (tmp_path / "shards" / ".nv-meta").mkdir(parents=True)
    (tmp_path / "shards" / ".nv-meta" / "dataset.yaml").write_text("__module__: x\n")
    (tmp_path / "bare_shards").mkdir()
    (tmp_path / "empty_ckpt").mkdir()
    (tmp_path / "not_a_ckpt").mkdir()
    (tmp_path / "not_a_ckpt" / "weights.bin").write_bytes(b"\0" * 8)
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
        (["optimizer.adam_beta1=1.0"], 4, r"adam_beta1 must be in \[0, 1\), got 1\.0"),
        (["optimizer.adam_beta2=-0.1"], 4, r"adam_beta2 must be in \[0, 1\), got -0\.1"),
        (["optimizer.weight_decay=-0.01"], 4, r"weight_decay must be >= 0, got -0\.01"),
        (["data.dataset_path={d}/bare_shards"], 4, r"bare_shards has no Energon metadata"),
        (["init.checkpoint={d}/empty_ckpt"], 4, r"init\.checkpoint: .*empty_ckpt holds no check"),
        (["init.checkpoint={d}/not_a_ckpt"], 4, r"init\.checkpoint: .*not_a_ckpt holds no check"),
        # Without a launcher the trainer is a world of one process: checked as such.
        ([], None, r"world size 1 is not divisible by tp×ulysses×ring×pp = 1×2×2×1 = 4"),
    ],
)
def test_bad_configs_name_the_field(stage_yaml, overrides, world, message, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    overrides = [o.replace("{d}", str(stage_yaml.parent)) for o in overrides]
    with pytest.raises(ConfigError, match=message):
        load_train_config(stage_yaml, overrides, world_size=world)


def _saved_checkpoint(run_dir, world_size: int, parallel: dict) -> None:
    """The files of a finished checkpoint that a resume reads before loading anything."""
    iteration = run_dir / "checkpoints" / "iter_0000002"
    iteration.mkdir(parents=True)
    state = {"step": 2, "world_size": world_size, "config": {"parallel": parallel}}
    (iteration / "train_state.json").write_text(json.dumps(state))
    (run_dir / "checkpoints" / "latest").write_text("iter_0000002\n")


@pytest.mark.parametrize(
    ("overrides", "world", "message"),
    [
        # dp 1 -> 2 on the same world: the per-replica data position cannot be mapped.
        (["parallel.ring=1"], 4, r"written by 4 ranks with dp=1, this run has 4 ranks with dp=2"),
        (["parallel.ring=1"], 2, r"written by 4 ranks with dp=1, this run has 2 ranks with dp=1"),
    ],
)
def test_resume_on_another_dp_or_world_stops_before_loading(stage_yaml, overrides, world, message):
    _saved_checkpoint(stage_yaml.parent / "run", 4, {"tp": 1, "ulysses": 2, "ring": 2, "pp": 1})
    with pytest.raises(ConfigError, match=message + r".*init\.checkpoint="):
        load_train_config(stage_yaml, overrides, world_size=world)
    # tp / sp / pp may change on the same world and dp (the checkpoint reshards).
    config = load_train_config(stage_yaml, ["parallel.tp=2", "parallel.ring=1"], world_size=4)
    assert config.parallel.tp == 2
