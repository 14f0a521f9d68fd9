"""The launcher resolves the layout from the YAML and the allocation, and refuses bad sizes."""

from __future__ import annotations

import shlex
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


def _auto_config(tmp_path, seq=65536, preset="longvila-llama3-8b", micro_batches=4):
    path = tmp_path / "auto.yaml"
    path.write_text(
        f"model: {{preset: {preset}}}\nparallel: auto\n"
        f"run: {{micro_batches_per_step: {micro_batches}, precision: bf16}}\n"
        f"data: {{max_seq_length: {seq}, micro_batch_size: 1}}\n"
    )
    return str(path)


def test_auto_layout_dry_run_prints_the_plan_beside_the_runner_up(tmp_path, monkeypatch, capsys):
    """Reference: the planner called directly on the same workload and allocation."""
    import yaml

    from megatron_longvila.training import auto_layout
    from megatron_longvila.training.config import ModelSection, ParallelConfig
    from megatron_longvila.training.config_io import apply_overrides, from_dict

    monkeypatch.delenv("SLURM_NNODES", raising=False)
    config = _auto_config(tmp_path)
    args = ["--config", config, "--nproc-per-node", "8", "--nnodes", "4", "--dry-run"]
    assert launcher.main(args) == 0
    out = capsys.readouterr().out
    with open(config, encoding="utf-8") as handle:
        tree = yaml.safe_load(handle)
    arch = from_dict(ModelSection, tree["model"], "model").build()
    planned = auto_layout.plan_layout(tree, arch, 4, 8)
    s = planned.chosen.strategy
    assert planned.runner_up is not None and planned.runner_up.layout != planned.chosen.layout
    assert f"chosen: tp={s.tp} ulysses={s.ulysses} ring={s.ring} pp={s.pp} dp={s.dp}" in out
    assert f"predicted step {planned.chosen.seconds:.2f} s" in out and "runner-up: tp=" in out
    assert "GiB per GPU of" in out
    assert f"4 node(s) × 8 process(es): tp={s.tp} ulysses={s.ulysses} ring={s.ring}" in out
    # The command hands the layout on; the trainer's config reads it back as an explicit one.
    override = auto_layout.as_override(planned.parallel)
    assert shlex.quote(override) in out
    handed = apply_overrides({"parallel": "auto"}, [override])["parallel"]
    parallel = from_dict(ParallelConfig, handed, "parallel")
    assert (parallel.tp, parallel.ulysses, parallel.ring, parallel.pp) == (
        s.tp, s.ulysses, s.ring, s.pp
    )


def test_an_explicit_layout_wins_over_auto(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("SLURM_NNODES", raising=False)
    config = _auto_config(tmp_path)
    args = ["--config", config, "--nproc-per-node", "8", "--dry-run", "parallel.ulysses=8"]
    assert launcher.main(args) == 0
    out = capsys.readouterr().out
    assert "parallel: auto" not in out and "tp=1 ulysses=8 ring=1 pp=1 sp=8 dp=1" in out
    assert "parallel={" not in out


def test_auto_layout_refuses_naming_the_missing_resource(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("SLURM_NNODES", raising=False)
    config = _auto_config(tmp_path, seq=4 * 1024 * 1024, micro_batches=1)
    assert launcher.main(["--config", config, "--nproc-per-node", "8", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "parallel: auto: nothing fits 4194304 tokens per sequence on 8 GPUs" in err
    assert "short of GPU memory by" in err and "GPUs would hold it" in err


def test_the_trainer_leaves_auto_to_the_launcher(tmp_path):
    import pytest

    from megatron_longvila.training.config import load_train_config
    from megatron_longvila.training.config_io import ConfigError

    with pytest.raises(ConfigError, match="parallel: auto is planned by the launcher"):
        load_train_config(_auto_config(tmp_path))
