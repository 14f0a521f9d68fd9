"""Strict YAML configs: overrides, unknown keys with suggestions, type errors naming the field."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import pytest

from megatron_longvila.training.config_io import ConfigError, from_dict, load_config


@dataclass
class Inner:
    lr: float = 1e-3
    betas: tuple[float, ...] = (0.9, 0.95)
    kind: Literal["adam", "sgd"] = "adam"

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")


@dataclass
class Outer:
    name: str
    steps: int = 10
    path: str | None = None
    optimizer: Inner = field(default_factory=Inner)
    freeze: list[str] = field(default_factory=list)


def test_yaml_plus_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("name: run\noptimizer:\n  lr: 0.1\n")
    config = load_config(
        Outer, path, ["optimizer.lr=3e-4", "steps=5", "freeze=[vision_tower]", "path=null"]
    )
    assert config == Outer(
        name="run", steps=5, optimizer=Inner(lr=3e-4), freeze=["vision_tower"], path=None
    )
    assert config.optimizer.betas == (0.9, 0.95)


@pytest.mark.parametrize(
    ("tree", "message"),
    [
        (
            {"name": "x", "optimizer": {"lrr": 1}},
            r"unknown config key 'optimizer\.lrr'.*'optimizer\.lr'",
        ),
        ({"name": "x", "steps": "ten"}, r"steps must be an integer, got 'ten'"),
        ({"name": "x", "steps": True}, r"steps must be an integer"),
        ({"name": "x", "optimizer": {"kind": "lion"}}, r"optimizer\.kind must be one of"),
        ({"name": "x", "optimizer": {"lr": -1}}, r"optimizer: lr must be > 0, got -1"),
        ({}, r"missing required config key 'name'"),
        ({"name": "x", "optimizer": 3}, r"optimizer must be a mapping"),
    ],
)
def test_errors_name_the_field(tree, message):
    with pytest.raises(ConfigError, match=message):
        from_dict(Outer, tree)


def test_bad_override_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not of the form key=value"):
        load_config(Outer, None, ["steps"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(Outer, tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="name is a value, not a section"):
        load_config(Outer, None, ["name=x", "name.sub=1"])
