"""The training loader end to end: damaged input, DP × SP rank mapping, exact resume, packing.

References: the list of samples the test put into the shards (which must arrive exactly once,
which must be skipped and how each is counted); for DP × SP, loaders built in this process with
explicit ``dp_rank``/``dp_size`` (no megatron-core involved); for resume, the batches the saving
loader yields after the save point; for packing, the same samples loaded unpacked.
"""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from data_fixtures import (
    SYNTHETIC_KEYS,
    data_config,
    scratch_dir,
    synthetic_shards,
    tiny_tokenizer_dir,
)
from PIL import Image

from megatron_longvila.data.batch import IGNORE_INDEX, PAD_SEGMENT
from megatron_longvila.data.config import DataConfig
from megatron_longvila.data.loader import build_train_loader
from megatron_longvila.data.shard_index import prepare_energon_dataset
from megatron_longvila.data.synthetic import SyntheticVideoSpec, write_synthetic_video

ROOT = Path(__file__).resolve().parents[1]


def _keys(loader) -> list[str]:
    return [key for batch in loader for row in batch.keys for key in row]


# ---- damaged input ---------------------------------------------------------------------------


def _json(question: str, answer: str = "A short answer.") -> bytes:
    turns = [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
    return json.dumps({"conversations": turns}).encode()


def _video_bytes(ext: str, frames: int = 12, seed: int = 0) -> bytes:
    path = scratch_dir() / "damaged-media" / f"{seed}_{frames}.{ext}"
    if not path.exists():
        spec = SyntheticVideoSpec(num_frames=frames, width=32, height=32, seed=seed, texture=20)
        write_synthetic_video(path, spec)
    return path.read_bytes()


def _png(colour=(10, 200, 10)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (24, 16), colour).save(buffer, format="PNG")
    return buffer.getvalue()


GOOD = [
    "good_video",
    "good_mkv",
    "good_image",
    "text_only",
    "short_video",
    "good_webm",
    "good_c0",
    "good_c1",
    "good_d0",
]
COUNTS = {
    "tar_read_error": 1,
    "bad_json": 3,
    "media_mismatch": 1,
    "corrupt_video": 2,
    "corrupt_image": 1,
    "short_video": 1,
    "too_long": 1,
    "error": 0,
}


def _write_tar(path: Path, samples: dict[str, dict[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for key, parts in samples.items():
            for ext, data in parts.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def _cut_inside(path: Path, member: str) -> None:
    """Truncate the tar in the middle of ``member``'s bytes."""
    with tarfile.open(path) as tar:
        info = tar.getmember(member)
    path.write_bytes(path.read_bytes()[: info.offset_data + info.size // 2])


def _damaged_dataset() -> Path:
    """Shards holding good samples and every kind of damage; shard 2 is cut after indexing,
    shard 3 before."""
    root = scratch_dir() / "damaged"
    if (root / ".nv-meta" / "dataset.yaml").exists():
        return root
    root.mkdir(parents=True)
    mp4 = _video_bytes("mp4")
    video_q = _json("<video>\nWhat happens?")
    shards = [
        {
            "good_video": {"json": video_q, "mp4": mp4},
            "good_mkv": {"json": video_q, "mkv": _video_bytes("mkv", seed=1)},
            "good_image": {"json": _json("<image>\nWhich colour?"), "png": _png()},
            "text_only": {"json": _json("Say something.")},
            "short_video": {"json": video_q, "mp4": _video_bytes("mp4", frames=3, seed=2)},
            "corrupt_video": {"json": video_q, "mp4": np.random.default_rng(0).bytes(4000)},
            "truncated_video": {"json": video_q, "mp4": mp4[: len(mp4) * 6 // 10]},
        },
        {
            "no_json": {"mp4": mp4},
            "bad_json": {"json": b'{"conversations": [', "mp4": mp4},
            "no_reply": {"json": json.dumps([{"from": "human", "value": "?"}]).encode()},
            "mismatch": {"json": _json("<video><video>\nBoth?"), "mp4": mp4},
            "too_long": {"json": _json("<video>\n" + "tell me more " * 120), "mp4": mp4},
            "corrupt_image": {
                "json": _json("<image>\nWhat?"),
                "png": b"\x89PNG\r\n\x1a\n" + bytes(50),
            },
            "good_webm": {"json": video_q, "webm": _video_bytes("webm", seed=3)},
        },
        {
            "good_c0": {"json": video_q, "mp4": mp4},
            "good_c1": {"json": _json("Text.")},
            "cut_c2": {"json": video_q, "mp4": _video_bytes("mp4", seed=4)},
        },
        {
            "good_d0": {"json": video_q, "mp4": _video_bytes("mp4", seed=5)},
            "cut_d1": {"json": video_q, "mp4": _video_bytes("mp4", seed=6)},
        },
    ]
    for i, samples in enumerate(shards):
        _write_tar(root / f"shard-{i}.tar", samples)
    _cut_inside(root / "shard-3.tar", "cut_d1.mp4")
    report = prepare_energon_dataset(root)
    assert [t.lost_keys for t in report.truncated] == [["cut_d1"]]
    _cut_inside(root / "shard-2.tar", "cut_c2.mp4")  # after indexing
    return root


@pytest.mark.parametrize("num_workers", [0, 2])
def test_damaged_samples_are_skipped_counted_and_logged_once(num_workers, caplog):
    caplog.set_level(logging.INFO, logger="megatron_longvila.data")
    config = data_config(_damaged_dataset(), num_workers=num_workers, micro_batch_size=3)
    loader = build_train_loader(config, dp_rank=0, dp_size=1)
    keys = _keys(loader)
    assert sorted(keys) == sorted(GOOD), "every good sample exactly once"
    assert loader.issue_counts() == COUNTS
    if num_workers == 0:  # worker processes log to their own stderr, not to caplog
        logged = [(r.levelname, r.getMessage()) for r in caplog.records]
        for key in ["cut_c2", "no_json", "bad_json", "no_reply", "mismatch", "too_long"]:
            assert sum(f"sample {key}:" in m for _, m in logged) == 1, key
        assert ("INFO", "sample short_video: short_video (3 frames, 4 asked; using all)") in logged


# ---- rank mapping ----------------------------------------------------------------------------


def _keys_on_this_rank(dataset: str, tokenizer: str) -> dict:
    from megatron.core import parallel_state

    parallel_state.initialize_model_parallel(context_parallel_size=2)
    dp_rank = parallel_state.get_data_parallel_rank()
    dp_size = parallel_state.get_data_parallel_world_size()
    config = DataConfig(
        dataset_path=dataset,
        tokenizer_path=tokenizer,
        num_frames=2,
        image_size=16,
        tokens_per_frame=1,
        max_seq_length=256,
        micro_batch_size=2,
        num_workers=0,
        repeat=False,
    )
    return {
        "dp": (dp_rank, dp_size),
        "sp_rank": parallel_state.get_context_parallel_rank(),
        "keys": _keys(build_train_loader(config, dp_rank, dp_size)),
    }


def test_dp2_sp2_ranks_get_their_replicas_samples(ranks4):
    dataset, tokenizer = str(synthetic_shards()), str(tiny_tokenizer_dir())
    results = ranks4.run(_keys_on_this_rank, dataset, tokenizer)
    by_dp: dict[int, list] = {}
    for result in results:
        assert result["dp"][1] == 2
        by_dp.setdefault(result["dp"][0], []).append(result)
    assert sorted(by_dp) == [0, 1]
    for dp_rank, group in by_dp.items():
        assert sorted(r["sp_rank"] for r in group) == [0, 1]
        assert group[0]["keys"] == group[1]["keys"], "one SP group reads the same samples"
        config = data_config(num_frames=2, image_size=16, tokens_per_frame=1)
        reference = _keys(build_train_loader(config, dp_rank, 2))
        assert group[0]["keys"] == reference
    replicas = [set(by_dp[0][0]["keys"]), set(by_dp[1][0]["keys"])]
    assert not replicas[0] & replicas[1]
    assert sorted(replicas[0] | replicas[1]) == SYNTHETIC_KEYS


def test_order_is_fixed_by_the_seed():
    orders = {
        seed: [_keys(build_train_loader(data_config(seed=seed), 0, 1)) for _ in range(2)]
        for seed in (1, 2)
    }
    assert orders[1][0] == orders[1][1] and orders[2][0] == orders[2][1]
    assert orders[1][0] != orders[2][0]
    assert sorted(orders[1][0]) == sorted(orders[2][0]) == SYNTHETIC_KEYS


# ---- resume ----------------------------------------------------------------------------------

RESUME_CASES = {
    "no-workers": dict(num_workers=0),
    "2-workers-shuffle-buffer": dict(num_workers=2, shuffle_buffer_size=3),
    "2-workers-packing": dict(
        num_workers=2, packing=True, packing_buffer_size=4, max_seq_length=96
    ),
}

_RESTORE_IN_NEW_PROCESS = """
import json, sys
from megatron_longvila.data.config import DataConfig
from megatron_longvila.data.loader import build_train_loader
out = {}
for name, case in json.load(open(sys.argv[1])).items():
    loader = build_train_loader(DataConfig(**case["config"]), 0, 1)
    loader.load_state_dict(json.load(open(case["state"])))
    out[name] = [batch.keys for batch in loader]
print(json.dumps(out))
"""


def test_restored_loader_in_a_new_process_yields_exactly_the_remaining_batches(tmp_path):
    cases, expected = {}, {}
    for name, overrides in RESUME_CASES.items():
        config = data_config(**overrides)
        loader = build_train_loader(config, 0, 1)
        iterator = iter(loader)
        seen = [next(iterator).keys for _ in range(2)]
        state = loader.state_dict()
        expected[name] = [batch.keys for batch in iterator]
        assert seen and expected[name], "the save point lies inside the epoch"
        # JSON types only: loads with torch's weights_only unpickler too.
        torch.save(state, tmp_path / f"{name}.pt")
        assert torch.load(tmp_path / f"{name}.pt", weights_only=True) == state
        (tmp_path / f"{name}.json").write_text(json.dumps(state))
        cases[name] = {"config": config.__dict__, "state": str(tmp_path / f"{name}.json")}
    (tmp_path / "cases.json").write_text(json.dumps(cases))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    run = subprocess.run(
        [sys.executable, "-c", _RESTORE_IN_NEW_PROCESS, str(tmp_path / "cases.json")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    restored = json.loads(run.stdout.strip().splitlines()[-1])
    for name in RESUME_CASES:
        assert restored[name] == expected[name], name


def test_restore_refuses_a_state_from_another_replica():
    state = build_train_loader(data_config(), 0, 2).state_dict()
    with pytest.raises(ValueError, match="dp_rank: saved 0, now 1"):
        build_train_loader(data_config(), 1, 2).load_state_dict(state)


# ---- batches and packing ---------------------------------------------------------------------


def test_batches_follow_the_contract():
    loader = build_train_loader(data_config(micro_batch_size=3), 0, 1)
    tok = loader.tokenizer
    for batch in loader:
        b, s = batch.input_ids.shape
        assert batch.labels.shape == batch.segment_ids.shape == (b, s)
        pad = batch.segment_ids == PAD_SEGMENT
        assert (batch.input_ids[pad] == tok.pad_id).all()
        assert (batch.labels[pad] == IGNORE_INDEX).all()
        assert set(batch.segment_ids[~pad].tolist()) == {0}
        assert (batch.input_ids == tok.video_id).sum() == len(batch.media) == b
        for media in batch.media:  # 64×64 videos scaled to 32×32 pixels, left for the model
            assert media.shape == (4, 3, 32, 32) and media.dtype == torch.uint8
        assert all(len(row) == 1 for row in batch.keys)


def test_packed_rows_fit_and_hold_the_unpacked_samples():
    unpacked = {}
    for batch in build_train_loader(data_config(micro_batch_size=1), 0, 1):
        (key,) = batch.keys[0]
        unpacked[key] = (batch.input_ids[0], batch.labels[0], batch.media)
    config = data_config(packing=True, packing_buffer_size=6, max_seq_length=110)
    seen, longest_row = [], 0
    for batch in build_train_loader(config, 0, 1):
        media = iter(batch.media)
        for r, row in enumerate(batch.keys):
            start = 0
            for segment, key in enumerate(row):
                ids, labels, sample_media = unpacked[key]
                end = start + len(ids)
                assert torch.equal(batch.input_ids[r, start:end], ids)
                assert torch.equal(batch.labels[r, start:end], labels)
                assert (batch.segment_ids[r, start:end] == segment).all()
                for expected in sample_media:
                    assert torch.equal(next(media), expected)
                start = end
            assert (batch.segment_ids[r, start:] == PAD_SEGMENT).all()
            expanded = start + sum(4 * 4 - 1 for _ in row)  # 4 frames × 4 tokens per <video>
            assert expanded <= config.max_seq_length
            seen += row
            longest_row = max(longest_row, len(row))
        assert next(media, None) is None
    assert sorted(seen) == SYNTHETIC_KEYS
    assert longest_row > 1, "some rows hold several samples"


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(resize_mode="stretch"), "resize_mode='stretch'"),
        (dict(chat_template="vicuna"), "chat_template='vicuna'"),
        (dict(num_frames=0), "num_frames=0"),
        (dict(max_consecutive_skips=0), "max_consecutive_skips=0"),
        (dict(packing=True, shuffle_buffer_size=8, num_workers=2), "cannot restore"),
    ],
)
def test_config_refuses_bad_values_naming_them(overrides, message):
    with pytest.raises(ValueError, match=message):
        data_config(**overrides)


def test_unexpected_errors_are_counted_and_the_job_goes_on(monkeypatch, caplog):
    import megatron_longvila.data.task_encoder as task_encoder

    records = (synthetic_shards().parent / "raw" / "samples.jsonl").read_text().splitlines()
    needle_keys = {
        r["id"] for r in map(json.loads, records) if "number" in r["conversations"][0]["value"]
    }
    assert 0 < len(needle_keys) < len(SYNTHETIC_KEYS)
    real = task_encoder.tokenize_conversation

    def failing_on_needle_questions(turns, *args, **kwargs):
        if "number" in turns[0]["value"]:
            raise RuntimeError("tokenizer crashed")
        return real(turns, *args, **kwargs)

    monkeypatch.setattr(task_encoder, "tokenize_conversation", failing_on_needle_questions)
    caplog.set_level(logging.WARNING, logger="megatron_longvila.data")
    loader = build_train_loader(data_config(), 0, 1)
    assert sorted(_keys(loader)) == sorted(set(SYNTHETIC_KEYS) - needle_keys)
    assert loader.issue_counts()["error"] == len(needle_keys)
    logged = [r for r in caplog.records if "tokenizer crashed" in r.getMessage()]
    assert sorted(r.getMessage().split(":")[0] for r in logged) == sorted(
        f"sample {k}" for k in needle_keys
    )
    assert all(r.exc_info for r in logged), "logged with the traceback"


# ---- nothing to train on -----------------------------------------------------------------------


def _captionless_dataset() -> Path:
    """Four samples whose .json is metadata without a conversation, one naming two videos."""
    root = scratch_dir() / "no-conversations"
    if (root / ".nv-meta" / "dataset.yaml").exists():
        return root
    root.mkdir(parents=True)
    mp4 = _video_bytes("mp4")
    samples = {
        f"meta_{i}": {"json": json.dumps({"url": f"v{i}"}).encode(), "mp4": mp4} for i in range(4)
    }
    samples["mismatch"] = {"json": _json("<video><video>\nBoth?"), "mp4": mp4}
    _write_tar(root / "shard-0.tar", samples)
    prepare_energon_dataset(root)
    return root


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize(
    "dataset, overrides, counted, example",
    [
        ("no_conversations", {}, "bad_json", "JSON object without 'conversations'"),
        ("synthetic", {"max_seq_length": 8}, "too_long", "> max_seq_length 8"),
    ],
)
def test_a_loader_that_skips_everything_stops_with_the_counts(
    num_workers, dataset, overrides, counted, example
):
    """Repeating data that yields nothing must stop, not spin: the limit of skips in a row
    names the counts and an example of each kind."""
    from megatron_longvila.data.sample_issues import TooManySkipped

    path = _captionless_dataset() if dataset == "no_conversations" else synthetic_shards()
    config = data_config(
        path, repeat=True, num_workers=num_workers, max_consecutive_skips=15, **overrides
    )
    loader = build_train_loader(config, 0, 1)
    with pytest.raises(TooManySkipped) as caught:
        next(iter(loader))
    message = str(caught.value)
    assert "samples were all skipped (data.max_consecutive_skips = 15)" in message
    assert f"'{counted}': " in message and example in message
    if dataset == "no_conversations" and num_workers == 0:  # workers: who skips first varies
        assert "media_mismatch: sample mismatch: text placeholders" in message, "each kind"


# ---- caption datasets ------------------------------------------------------------------------


def _video2dataset_shards() -> Path:
    """video2dataset's output layout: <key>.mp4, <key>.txt (caption), <key>.json (metadata)."""
    root = scratch_dir() / "video2dataset"
    if (root / ".nv-meta" / "dataset.yaml").exists():
        return root
    root.mkdir(parents=True)
    samples = {}
    for i in range(3):
        meta = {"url": f"https://example.org/{i}.mp4", "key": f"{i:09d}", "status": "success"}
        samples[f"{i:09d}"] = {
            "mp4": _video_bytes("mp4", seed=10 + i),
            "txt": f"Caption number {i}.".encode(),
            "json": json.dumps(meta).encode(),
        }
    samples["000000009"] = {"mp4": _video_bytes("mp4"), "txt": b"  \n"}  # empty caption
    _write_tar(root / "00000.tar", samples)
    prepare_energon_dataset(root)
    return root


@pytest.mark.parametrize("prompt", [None, "Summarize the clip."])
def test_caption_samples_become_one_turn_conversations(prompt):
    from megatron_longvila.data.chat_template import get_template, tokenize_conversation
    from megatron_longvila.data.tokenizer import load_tokenizer

    settings = {} if prompt is None else {"caption_prompt": prompt}
    config = data_config(_video2dataset_shards(), micro_batch_size=1, **settings)
    loader = build_train_loader(config, 0, 1)
    batches = {batch.keys[0][0]: batch for batch in loader}
    assert sorted(batches) == ["000000000", "000000001", "000000002"]
    assert loader.issue_counts()["bad_json"] == 1  # the empty caption

    template = get_template(config.chat_template)
    tokenizer = load_tokenizer(config.tokenizer_path, template.markers)
    asked = prompt or "Describe the video in detail."
    for key, batch in batches.items():
        turns = [
            {"from": "human", "value": "<video>\n" + asked},
            {"from": "gpt", "value": f"Caption number {int(key)}."},
        ]
        ids, labels = tokenize_conversation(turns, tokenizer, template, config.system_prompt)
        assert torch.equal(batch.input_ids[0], ids) and torch.equal(batch.labels[0], labels)
        assert len(batch.media) == 1 and batch.media[0].shape[0] == config.num_frames
