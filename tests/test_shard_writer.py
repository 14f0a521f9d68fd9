"""Shards from a folder + JSONL (tools/make_webdataset.py) and Energon metadata without prompts.

References: the JSONL records and files the test writes (what must be kept or skipped, and
why); tarfile's own member offsets for where a shard is cut; Energon's ``prepare_dataset``
itself for the failure on a shard cut short.
"""

from __future__ import annotations

import importlib.util
import io
import json
import shutil
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from megatron_longvila.data.shard_index import prepare_energon_dataset, scan_tar
from megatron_longvila.data.synthetic import SyntheticVideoSpec, write_synthetic_video

ROOT = Path(__file__).resolve().parents[1]


def _load_tool(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _conversation(question: str, answer: str = "An answer.") -> list[dict]:
    return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]


def _files(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_size for p in root.rglob("*") if p.is_file()}


def _write_inputs(root: Path) -> Path:
    media = root / "media"
    spec = SyntheticVideoSpec(num_frames=12, width=32, height=32, texture=30)
    for i in range(4):
        write_synthetic_video(
            media / f"v{i}.mp4", SyntheticVideoSpec(**{**spec.__dict__, "seed": i})
        )
    write_synthetic_video(root / "outside.mp4", spec)
    (media / "bad.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(3000))
    good = (media / "v0.mp4").read_bytes()
    (media / "cut.mp4").write_bytes(good[: len(good) // 2])
    Image.new("RGB", (40, 20), (200, 10, 10)).save(media / "img.png")
    lines = [
        *[
            json.dumps(
                {
                    "id": f"clip/{i}.a",
                    "video": f"v{i}.mp4",
                    "conversations": _conversation("<video>\nWhat?"),
                }
            )
            for i in range(4)
        ],
        json.dumps(
            {
                "id": "img",
                "image": "img.png",
                "conversations": _conversation("<image>\nColour?"),
                "source": "test",
            }
        ),
        json.dumps(
            {
                "id": "two",
                "images": ["img.png", "img.png"],
                "conversations": _conversation("<image><image> Same?"),
            }
        ),
        json.dumps({"id": "text", "conversations": _conversation("No media here.")}),
        json.dumps({"id": "cap", "video": "v1.mp4", "caption": " A clip. ", "url": "u"}),
        json.dumps({"id": "nocap", "video": "v1.mp4", "caption": ""}),
        json.dumps({"id": "capnomedia", "caption": "Nothing to describe."}),
        json.dumps(
            {"id": "noplace", "video": "v1.mp4", "conversations": _conversation("Describe.")}
        ),
        json.dumps(
            {"id": "bad", "video": "bad.mp4", "conversations": _conversation("<video>\nWhat?")}
        ),
        json.dumps(
            {"id": "cut", "video": "cut.mp4", "conversations": _conversation("<video>\nWhat?")}
        ),
        json.dumps(
            {
                "id": "escape",
                "video": "../outside.mp4",
                "conversations": _conversation("<video>\nWhat?"),
            }
        ),
        json.dumps(
            {"id": "missing", "video": "nope.mp4", "conversations": _conversation("<video>\nWhat?")}
        ),
        json.dumps(
            {
                "id": "noreply",
                "video": "v0.mp4",
                "conversations": _conversation("<video>\nWhat?")[:1],
            }
        ),
        json.dumps(
            {"id": "twice", "video": "v0.mp4", "conversations": _conversation("<video><video>")}
        ),
        "{not json",
    ]
    (media / "samples.jsonl").write_text("\n".join(lines) + "\n")
    return media / "samples.jsonl"


def test_make_webdataset_bounds_shards_skips_bad_records_and_writes_only_its_folder(
    tmp_path, capsys
):
    jsonl = _write_inputs(tmp_path)
    before = _files(tmp_path)
    out = tmp_path / "out"
    tool = _load_tool("make_webdataset")
    max_bytes = 2 * (tmp_path / "media" / "v0.mp4").stat().st_size + 12 * 1024
    assert tool.main([str(jsonl), str(out), "--max-shard-mb", str(max_bytes / (1 << 20))]) == 0
    printed = capsys.readouterr().out

    after = _files(tmp_path)
    assert {k: v for k, v in after.items() if not k.startswith("out/")} == before
    skipped = {line.split()[1]: line for line in printed.splitlines() if line.startswith("skipped")}
    assert set(skipped) == {
        "bad",
        "cut",
        "escape",
        "missing",
        "noreply",
        "twice",
        "line",
        "nocap",
        "capnomedia",
    }
    assert "non-empty string" in skipped["nocap"] and "needs a video" in skipped["capnomedia"]
    assert "leaves the media root" in skipped["escape"] and "unreadable" in skipped["cut"]
    assert "placeholders" in skipped["twice"] and "does not exist" in skipped["missing"]

    shards = sorted(out.glob("shard-*.tar"))
    assert len(shards) >= 3
    samples = {}
    for shard in shards:
        with tarfile.open(shard) as tar:
            members = tar.getmembers()
            keys = {m.name.split(".", 1)[0] for m in members}
            assert shard.stat().st_size <= max_bytes or len(keys) == 1
            for m in members:
                samples.setdefault(m.name.split(".", 1)[0], {})[m.name.split(".", 1)[1]] = (
                    tar.extractfile(m).read()
                )
    assert sorted(samples) == sorted(
        ["clip_0_a", "clip_1_a", "clip_2_a", "clip_3_a", "img", "two", "text", "noplace", "cap"]
    )
    # A caption record is written in video2dataset's layout: caption, metadata, media.
    assert set(samples["cap"]) == {"json", "txt", "mp4"} and samples["cap"]["txt"] == b"A clip."
    assert json.loads(samples["cap"]["json"]) == {"id": "cap", "url": "u", "media": ["video"]}
    assert set(samples["clip_2_a"]) == {"json", "mp4"}
    assert samples["clip_2_a"]["mp4"] == (tmp_path / "media" / "v2.mp4").read_bytes()
    assert set(samples["two"]) == {"json", "0.png", "1.png"} and set(samples["text"]) == {"json"}
    meta = json.loads(samples["img"]["json"])
    assert meta["conversations"][0]["value"].startswith("<image>") and meta["source"] == "test"
    assert meta["media"] == ["image"]

    info = json.loads((out / ".nv-meta" / ".info.json").read_text())
    assert sum(info["shard_counts"].values()) == 9
    assert "LongVILAWebdataset" in (out / ".nv-meta" / "dataset.yaml").read_text()
    assert (out / ".nv-meta" / "split.yaml").is_file()

    with pytest.raises(FileExistsError, match="not empty"):
        tool.main([str(jsonl), str(out)])
    assert tool.main([str(jsonl), str(out), "--overwrite"]) == 0
    assert len(list(out.glob("shard-*.tar"))) == 1


def _sample_tar(path: Path, sizes: list[tuple[str, int]]) -> list[tarfile.TarInfo]:
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, size in sizes:
            info = tarfile.TarInfo(name)
            info.size = size
            tar.addfile(info, io.BytesIO(bytes([len(name)]) * size))
    with tarfile.open(path) as tar:
        return tar.getmembers()


def test_scan_tar_finds_where_a_shard_is_cut(tmp_path):
    layout = [
        (f"s{i}.{ext}", size) for i in range(4) for ext, size in [("json", 100), ("mp4", 3000)]
    ]
    intact = tmp_path / "intact.tar"
    members = {m.name: m for m in _sample_tar(intact, layout)}
    data = intact.read_bytes()
    cuts = {
        "inside s3's video bytes": (
            members["s3.mp4"].offset_data + 1000,
            ["s0", "s1", "s2"],
            ["s3"],
        ),
        "inside s3's first header": (members["s3.json"].offset + 100, ["s0", "s1", "s2"], ["s3"]),
        "inside s2's second header": (members["s2.mp4"].offset + 300, ["s0", "s1"], ["s2"]),
        "in the end padding": (
            members["s3.mp4"].offset_data + 3072 + 200,
            ["s0", "s1", "s2", "s3"],
            [],
        ),
    }
    assert scan_tar(intact).complete == ["s0", "s1", "s2", "s3"]
    for where, (size, complete, lost) in cuts.items():
        cut = tmp_path / "cut.tar"
        cut.write_bytes(data[:size])
        scan = scan_tar(cut)
        assert (scan.complete, scan.lost, scan.truncated) == (complete, lost, bool(lost)), where


def test_energon_prepare_fails_on_a_cut_shard_and_ours_recovers_the_complete_samples(tmp_path):
    from megatron.energon.epathlib import EPath
    from megatron.energon.flavors.webdataset.base_webdataset import BaseWebdatasetFactory

    layout = [(f"a{i}.{ext}", 500) for i in range(3) for ext in ("json", "mp4")]
    (tmp_path / "ds").mkdir()
    _sample_tar(tmp_path / "ds" / "shard-0.tar", layout)
    members = _sample_tar(
        tmp_path / "ds" / "shard-1.tar", [(n.replace("a", "b"), s) for n, s in layout]
    )
    cut_at = next(m for m in members if m.name == "b2.mp4").offset_data + 100
    data = (tmp_path / "ds" / "shard-1.tar").read_bytes()[:cut_at]
    (tmp_path / "ds" / "shard-1.tar").write_bytes(data)
    energon_copy = tmp_path / "energon"
    shutil.copytree(tmp_path / "ds", energon_copy)

    with pytest.raises(AssertionError, match="has no samples"):
        BaseWebdatasetFactory.prepare_dataset(
            EPath(energon_copy),
            ["shard-0.tar", "shard-1.tar"],
            split_parts_ratio=[("train", 1.0)],
            workers=1,
        )

    report = prepare_energon_dataset(tmp_path / "ds")
    assert report.shards == ["shard-0.tar", "shard-1.recovered.tar"] and report.samples == 5
    (truncated,) = report.truncated
    assert (truncated.name, truncated.kept, truncated.lost_keys) == ("shard-1.tar", 2, ["b2"])
    assert (tmp_path / "ds" / "shard-1.tar").read_bytes() == data, "the damaged file is kept as is"
    info = json.loads((tmp_path / "ds" / ".nv-meta" / ".info.json").read_text())
    assert info["shard_counts"] == {"shard-0.tar": 3, "shard-1.recovered.tar": 2}
