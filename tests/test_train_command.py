"""The training command line: ``longvila-train CONFIG [key=value ...]`` as the README writes it,
and ``--config CONFIG`` as well (``python -m megatron_longvila.train`` runs the same ``main``);
what a run records of the Hugging Face LLM it descends from."""

from __future__ import annotations

import json

import pytest

from megatron_longvila.training.config import InitConfig
from megatron_longvila.training.trainer import inherited_llm_extras, main, parse_args


def test_config_positional_or_as_an_option():
    assert parse_args(["stage.yaml", "optimizer.lr=1e-4"]) == ("stage.yaml", ["optimizer.lr=1e-4"])
    assert parse_args(["--config", "stage.yaml", "a.b=1"]) == ("stage.yaml", ["a.b=1"])
    assert parse_args(["a.b=1", "--config", "stage.yaml"]) == ("stage.yaml", ["a.b=1"])


@pytest.mark.parametrize("argv", [[], ["optimizer.lr=1e-4"], ["stage.yaml", "not-an-override"]])
def test_a_command_without_config_or_with_a_stray_word_is_refused(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_args(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "give the stage YAML" in err or "key=value overrides, got" in err, err


def test_the_positional_config_is_read(tmp_path, capsys):
    missing = tmp_path / "no-such-stage.yaml"
    assert main([str(missing), "optimizer.lr=1e-4"]) == 2
    assert f"config file {missing} does not exist" in capsys.readouterr().err


def test_a_run_records_what_its_hugging_face_llm_said(tmp_path):
    llm = tmp_path / "hf" / "llm"
    llm.mkdir(parents=True)
    said = {
        "hidden_size": 64,
        "eos_token_id": [7, 9],
        "initializer_range": 0.01,
        "bos_token_id": None,
    }
    (llm / "config.json").write_text(json.dumps(said))
    extras = inherited_llm_extras(InitConfig(hf=str(tmp_path / "hf")))
    assert extras == {"eos_token_id": [7, 9], "initializer_range": 0.01}  # not the architecture
    previous = tmp_path / "stage1" / "iter_0000004"
    previous.mkdir(parents=True)
    (previous / ".metadata").write_bytes(b"")
    (previous / "train_state.json").write_text(json.dumps({"step": 4, "hf_llm_config": extras}))
    assert inherited_llm_extras(InitConfig(checkpoint=str(previous))) == extras
    assert inherited_llm_extras(InitConfig()) is None
