"""The launcher resolves the layout from the YAML and the allocation, and refuses bad sizes."""

from __future__ import annotations

import subprocess

from megatron_longvila.training import launcher


def _config(tmp_path, preset="longvila-llama3-8b", **parallel):
    path = tmp_path / "stage.yaml"
    lines = "".join(f"  {k}: {v}\n" for k, v in parallel.items())
    path.write_text(f"model: {{preset: {preset}}}\nparallel:\n{lines}")
    return str(path)


def test_dry_run_on_a_slurm_allocation(tmp_path, monkeypatch, capsys):
    config = _config(tmp_path, tp=2, ulysses=4, ring=8, pp=1)
    env = {"SLURM_NNODES": "32", "SLURM_JOB_ID": "77", "MASTER_ADDR": "node001"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert launcher.main(["--config", config, "--nproc-per-node", "8", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "32 node(s) × 8 process(es): tp=2 ulysses=4 ring=8 pp=1 sp=32 dp=4" in out
    assert "--nnodes=32 --rdzv-backend=c10d --rdzv-endpoint=node001:29500 --rdzv-id=77" in out
    assert "-m megatron_longvila.train --config" in out


def test_overrides_reach_layout_and_command(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("SLURM_NNODES", raising=False)
    config = _config(tmp_path, tp=1)
    args = ["--config", config, "--nproc-per-node", "4", "--dry-run", "parallel.ulysses=2"]
    assert launcher.main(args) == 0
    out = capsys.readouterr().out
    assert "sp=2 dp=2" in out and "--standalone" in out and "parallel.ulysses=2" in out


def test_sizes_that_do_not_divide_stop_before_launch(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("SLURM_NNODES", raising=False)
    config = _config(tmp_path, tp=2, ulysses=3)
    assert launcher.main(["--config", config, "--nproc-per-node", "8", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "world size 8 is not divisible by tp×ulysses×ring×pp = 2×3×1×1 = 6" in err


def test_a_layout_the_model_cannot_run_stops_before_launch(tmp_path, monkeypatch, capsys):
    """Qwen2-7B's 4 key/value heads can be neither split over nor replicated onto 7 Ulysses
    ranks (its 28 query heads can): the trainer's own check, before anything starts."""
    monkeypatch.delenv("SLURM_NNODES", raising=False)
    config = _config(tmp_path, preset="longvila-qwen2-7b", ulysses=7)
    assert launcher.main(["--config", config, "--nproc-per-node", "7", "--dry-run"]) == 2
    assert "4 key/value heads per tensor-parallel rank" in capsys.readouterr().err


def test_sbatch_scripts_parse():
    for stage in range(1, 6):
        script = f"examples/slurm/stage{stage}.sbatch"
        assert subprocess.run(["bash", "-n", script]).returncode == 0, script
    assert subprocess.run(["bash", "-n", "examples/slurm/launch_stage.sh"]).returncode == 0
