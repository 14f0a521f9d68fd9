"""What ``longvila-convert to-hf`` does when the input or the disk is bad: one ``error:`` line
naming the file, exit status 2, and nothing half-written in the output's place.

Faults: a truncated and a missing ``__*.distcp`` file and an unfinished ``.partial`` save made
from a real saved checkpoint; a full disk (ENOSPC) and a read-only output, raised where the
export writes (this machine runs as root, so permissions alone cannot refuse a write).
"""

from __future__ import annotations

import errno
import re
import shutil
from pathlib import Path

import pytest
from data_fixtures import tiny_tokenizer_dir

from megatron_longvila.convert.cli import main as convert


def _save(root: str, tokenizer_dir: str) -> None:
    from longvila_checkpoints import save_tiny_longvila_checkpoint
    from megatron.core import parallel_state

    parallel_state.initialize_model_parallel()
    save_tiny_longvila_checkpoint(root, tokenizer_dir)


@pytest.fixture(scope="module")
def saved(rank_pools, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ckpt") / "run"
    rank_pools(2).run(_save, str(root), str(tiny_tokenizer_dir()))
    return root


def _copy(saved: Path, tmp_path: Path) -> Path:
    shutil.copytree(saved, tmp_path / "run")
    return tmp_path / "run" / "iter_0000003"


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def _nothing_left(out: Path) -> None:
    assert not out.exists()
    assert not [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")]


def test_export_is_staged_and_renamed(saved, tmp_path, capsys):
    out = tmp_path / "hf"
    assert convert(["to-hf", str(saved), str(out), "--quiet"]) == 0
    assert (out / "llm" / "config.json").is_file() and (out / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]  # no staging folder left


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (
            lambda d: (d / "__0_0.distcp").write_bytes((d / "__0_0.distcp").read_bytes()[:100]),
            r"__0_0\.distcp is truncated: 100 bytes",
        ),
        (lambda d: (d / "__0_1.distcp").unlink(), r"__0_1\.distcp is missing"),
    ],
    ids=["truncated", "missing"],
)
def test_damaged_checkpoint_files_are_named(saved, tmp_path, capsys, damage, message):
    directory = _copy(saved, tmp_path)
    damage(directory)
    out = tmp_path / "hf"
    assert convert(["to-hf", str(directory), str(out), "--quiet"]) == 2
    line = _error_line(capsys)
    assert str(directory) in line and re.search(message, line), line
    _nothing_left(out)


def test_an_unfinished_save_is_called_what_it_is(saved, tmp_path, capsys):
    directory = _copy(saved, tmp_path)
    partial = directory.with_name("iter_0000004.partial")
    shutil.copytree(directory, partial)
    (partial / "train_state.json").unlink()  # written last: an interrupted save has none
    out = tmp_path / "hf"
    assert convert(["to-hf", str(partial), str(out), "--quiet"]) == 2
    line = _error_line(capsys)
    assert f"{partial} is an unfinished checkpoint" in line and str(directory) in line, line
    _nothing_left(out)


def test_a_full_disk_leaves_nothing_and_names_the_file(saved, tmp_path, capsys, monkeypatch):
    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("megatron_longvila.convert.safetensors_io.save_file", disk_full)
    out = tmp_path / "hf"
    assert convert(["to-hf", str(saved), str(out), "--quiet"]) == 2
    line = _error_line(capsys)
    assert re.search(rf"cannot write {out}: No space left on device \(.*\.safetensors\)", line)
    monkeypatch.undo()
    _nothing_left(out)


def test_a_read_only_output_folder_is_named(saved, tmp_path, capsys, monkeypatch):
    mkdir = Path.mkdir

    def read_only(path: Path, *args, **kwargs):
        if path.parent == tmp_path:  # what a read-only file system answers for new entries
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return mkdir(path, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", read_only)
    out = tmp_path / "hf"
    assert convert(["to-hf", str(saved), str(out), "--quiet"]) == 2
    line = _error_line(capsys)
    assert f"cannot write {out}: Read-only file system ({tmp_path}/.hf.partial-" in line, line
    monkeypatch.undo()
    _nothing_left(out)


def test_a_failed_forced_export_keeps_the_previous_folder(saved, tmp_path, capsys, monkeypatch):
    out = tmp_path / "hf"
    assert convert(["to-hf", str(saved), str(out), "--quiet"]) == 0
    before = sorted(p.relative_to(out) for p in out.rglob("*"))

    def fail(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("megatron_longvila.convert.safetensors_io.save_file", fail)
    assert convert(["to-hf", str(saved), str(out), "--quiet", "--force"]) == 2
    _error_line(capsys)
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]
