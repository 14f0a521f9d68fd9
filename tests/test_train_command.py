"""The training command line: ``longvila-train CONFIG [key=value ...]`` as the README writes it,
and ``--config CONFIG`` as well (``python -m megatron_longvila.train`` runs the same ``main``)."""

from __future__ import annotations

import pytest

from megatron_longvila.training.trainer import main, parse_args


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
