"""Checkpoint protocol: round trips, resharding, `latest`, partial folders, safe loading.

Reference: the state before saving. Tolerance: bit-identical tensors.
"""

from __future__ import annotations

import os
import pickle
import tempfile
from pathlib import Path

import pytest
import torch

from megatron_longvila.checkpoint.layout import CheckpointError
from megatron_longvila.checkpoint.manager import CheckpointManager
from megatron_longvila.checkpoint.safety import verify_checkpoint_metadata
from megatron_longvila.checkpoint.tensors import load_full_tensors


def _model_and_optimizer(tp: int):
    import tiny_gpt
    from megatron.core import parallel_state
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp)
    settings = tiny_gpt.TinyGPTSettings(num_layers=2, hidden_size=16, num_attention_heads=2)
    model = tiny_gpt.build_model(settings)
    optimizer = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=1e-2), [model])
    return tiny_gpt, settings, model, optimizer


def _state(model, optimizer):
    model_sd = model.module.sharded_state_dict()
    return {"model": model_sd, "optimizer": optimizer.sharded_state_dict(model_sd)}


def _full_params(model) -> dict[str, torch.Tensor]:
    """Parameters gathered to full tensors over TP (for comparisons across layouts)."""
    from megatron.core import parallel_state

    group = parallel_state.get_tensor_model_parallel_group()
    out = {}
    for name, p in model.module.named_parameters():
        dim = getattr(p, "partition_dim", -1) if getattr(p, "tensor_model_parallel", False) else -1
        if dim >= 0 and group.size() > 1:
            parts = [torch.empty_like(p) for _ in range(group.size())]
            torch.distributed.all_gather(parts, p.detach().contiguous(), group=group)
            out[name] = torch.cat(parts, dim=dim)
        else:
            out[name] = p.detach().clone()
    return out


def _save_after_steps(root: str, tp: int, steps: list[int]):
    tiny_gpt, settings, model, optimizer = _model_and_optimizer(tp)
    manager = CheckpointManager(root, keep_last=2)
    for step in steps:
        tiny_gpt.train_steps(model, optimizer, settings, 1)
        rng = torch.get_rng_state()
        manager.save(step, _state(model, optimizer), {"consumed": step * 4}, {"cpu_rng": rng})
    return _full_params(model), manager.complete_steps(), (Path(root) / "latest").read_text()


def _load(root: str, tp: int):
    _, _, model, optimizer = _model_and_optimizer(tp)
    for p in model.module.parameters():
        p.data.zero_()
    manager = CheckpointManager(root)
    loaded = manager.load(_state(model, optimizer))
    model.module.load_state_dict(loaded.sharded["model"])
    optimizer.load_state_dict(loaded.sharded["optimizer"])
    return _full_params(model), loaded.step, loaded.train_state["consumed"], loaded.rank_tensors


def test_save_prune_and_load_across_tp_layouts(ranks2):
    root = tempfile.mkdtemp(prefix="mlv-ckpt-")
    saved = ranks2.run(_save_after_steps, root, 2, [1, 2, 3])
    params, steps, latest = saved[0]
    assert steps == [2, 3], "keep_last=2 keeps the two newest"
    assert latest.strip() == "iter_0000003"

    same = ranks2.run(_load, root, 2)  # same layout: per-rank state comes back
    resharded = ranks2.run(_load, root, 1)  # TP=2 -> TP=1
    for result in same + resharded:
        loaded_params, step, consumed, _ = result
        assert step == 3 and consumed == 12
        for name, value in params.items():
            assert torch.equal(loaded_params[name], value), name
    assert same[0][3] is not None and "cpu_rng" in same[0][3]

    # One process, no process group: full tensors straight from the files.
    # Keys are the modules' sharded keys (optimizer state sits under "optimizer.").
    by_name = load_full_tensors(Path(root) / "iter_0000003", "")
    assert torch.equal(
        by_name["embedding.word_embeddings.weight"], params["embedding.word_embeddings.weight"]
    )
    stacked = by_name["decoder.layers.self_attention.linear_qkv.weight"]
    assert stacked.shape[0] == 2  # the two layers, stacked
    assert torch.equal(stacked[1], params["decoder.layers.1.self_attention.linear_qkv.weight"])


class _KilledBeforePublish(CheckpointManager):
    """Dies where a SIGKILL would hurt most: shards and train_state written, not yet renamed."""

    def _publish(self, partial, final):
        raise KeyboardInterrupt("killed before the rename")


def _crash_during_rename(root: str):
    _, _, model, optimizer = _model_and_optimizer(1)
    CheckpointManager(root).save(1, _state(model, optimizer), {"consumed": 4})
    try:
        _KilledBeforePublish(root).save(2, _state(model, optimizer), {"consumed": 8})
    except KeyboardInterrupt:
        # Only rank 0 publishes; meet the other rank at the barrier ending its save().
        torch.distributed.barrier()
    return sorted(p.name for p in Path(root).iterdir()), str(CheckpointManager(root).latest_dir())


def test_checkpoint_killed_before_rename_is_never_latest(ranks2):
    root = tempfile.mkdtemp(prefix="mlv-ckpt-")
    names, latest = ranks2.run(_crash_during_rename, root)[0]
    assert "iter_0000002.partial" in names
    assert latest.endswith("iter_0000001")
    # A stale pointer to a folder that is not complete is ignored too.
    (Path(root) / "latest").write_text("iter_0000002\n")
    assert CheckpointManager(root).latest_dir().name == "iter_0000001"


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_metadata_with_foreign_objects_is_refused(tmp_path):
    (tmp_path / ".metadata").write_bytes(pickle.dumps(_Evil()))
    with pytest.raises(CheckpointError, match=r"(posix|os)\.system"):
        verify_checkpoint_metadata(tmp_path)
    with pytest.raises(CheckpointError, match=r"no \.metadata"):
        verify_checkpoint_metadata(tmp_path / "missing")


def test_load_without_checkpoint_names_the_root(tmp_path):
    with pytest.raises(CheckpointError, match=str(tmp_path)):
        CheckpointManager(tmp_path).load({})


class _TouchOnLoad:
    """Unpickling it runs a shell command: creates ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _first_byte_entry(directory: Path) -> tuple[str, Path, int, int]:
    """(key, file, offset, length) of a byte entry (a layer's ``_extra_state``) of a checkpoint."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    metadata = FileSystemReader(str(directory)).read_metadata()
    for index, info in sorted(metadata.storage_data.items(), key=lambda item: item[0].fqn):
        if isinstance(metadata.state_dict_metadata[index.fqn], BytesStorageMetadata):
            return index.fqn, directory / info.relative_path, info.offset, info.length
    raise AssertionError(f"{directory} holds no byte entry")


def _load_refusals(root: str) -> list[str]:
    """Every way a rank loads a dist checkpoint (resume / init.checkpoint, inference weights);
    what each refused with."""
    from megatron_longvila.checkpoint.manager import load_model_weights

    _, _, model, optimizer = _model_and_optimizer(2)
    refusals = []
    for load in (
        lambda: CheckpointManager(root).load(_state(model, optimizer)),
        lambda: load_model_weights(model.module, CheckpointManager(root).latest_dir()),
    ):
        try:
            load()
            refusals.append("")
        except CheckpointError as error:
            refusals.append(str(error))
    return refusals


def test_tampered_pickles_inside_a_checkpoint_never_run(ranks2, tmp_path):
    root = tmp_path / "ckpt"
    ranks2.run(_save_after_steps, str(root), 2, [1])
    directory = root / "iter_0000001"
    marker = tmp_path / "ran"
    payload = pickle.dumps(_TouchOnLoad(marker), protocol=2)

    # A byte entry of a __*.distcp file, overwritten in place: torch's own planner would run it.
    key, distcp, offset, length = _first_byte_entry(directory)
    assert key.endswith("_extra_state/shard_0_2") and len(payload) < length
    original = distcp.read_bytes()
    distcp.write_bytes(
        original[:offset] + payload.ljust(length, b"\0") + original[offset + length :]
    )
    for refusal in ranks2.run(_load_refusals, str(root))[0]:
        assert str(distcp) in refusal and repr(key) in refusal, refusal
        assert "system" in refusal, refusal
    assert not marker.exists()

    # common.pt (megatron's non-tensor state) is held to the same rule.
    distcp.write_bytes(original)
    common = directory / "common.pt"
    torch.save(_TouchOnLoad(marker), common)
    for refusal in ranks2.run(_load_refusals, str(root))[0]:
        assert str(common) in refusal and "system" in refusal, refusal
    assert not marker.exists()
