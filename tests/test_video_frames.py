"""Frame sampling and decoding, resize and normalization.

References: a plain PyAV decode of every frame in order (same swscale conversion), from which
the sampled indices are picked; the frames must be identical (exact, uint8). Normalization and
pad/crop geometry: numpy written out in the test (tolerance 1e-6, fp32).
"""

from __future__ import annotations

import av
import numpy as np
import pytest
import torch
from data_fixtures import scratch_dir
from megatron.energon.av import av_reader

from megatron_longvila.data.synthetic import SyntheticVideoSpec, write_synthetic_video
from megatron_longvila.data.video import (
    VideoDecodeError,
    check_video_readable,
    decode_frames,
    frames_to_sample,
    probe_video,
    uniform_frame_indices,
)
from megatron_longvila.data.vision_transform import fit_frames, scaled_size, to_tower_input


def _video(ext: str, num_frames: int = 60, keyint: int = 12) -> bytes:
    spec = SyntheticVideoSpec(
        num_frames=num_frames, width=64, height=48, seed=3, keyframe_interval=keyint, texture=40
    )
    path = scratch_dir() / "frames" / f"v{num_frames}_{keyint}.{ext}"
    if not path.exists():
        write_synthetic_video(path, spec)
    return path.read_bytes()


def _reference_frames(data: bytes, size: tuple[int, int]) -> list[np.ndarray]:
    import io

    with av.open(io.BytesIO(data)) as container:
        # Scaled in the video's own pixel format, then converted (as decode_frames does).
        return [
            f.reformat(
                width=size[0], height=size[1], format=f.format.name, interpolation="BILINEAR"
            )
            .reformat(format="rgb24")
            .to_ndarray()
            .transpose(2, 0, 1)
            for f in container.decode(video=0)
        ]


def test_uniform_indices_spread_evenly_and_take_all_of_short_videos():
    for total in [1, 7, 60, 1000]:
        for wanted in [1, 3, 8, 64, 1024]:
            idx = uniform_frame_indices(total, wanted)
            assert idx == sorted(set(idx)) and idx[0] >= 0 and idx[-1] < total
            if wanted >= total:
                assert idx == list(range(total))
            else:
                assert len(idx) == wanted
                gaps = np.diff([*idx, idx[0] + total])  # cyclic gaps differ by at most 1
                assert gaps.max() - gaps.min() <= 1
    assert uniform_frame_indices(60, 4) == [7, 22, 37, 52]


@pytest.mark.parametrize("ext", ["mp4", "mkv", "webm", "avi"])
def test_sampled_frames_equal_a_full_decode(ext):
    data = _video(ext)
    info = probe_video(data)
    assert (info.num_frames, info.width, info.height, info.fps) == (60, 64, 48, 8.0)
    size = scaled_size(64, 48, 32, "pad")
    reference = _reference_frames(data, size)
    for indices in [uniform_frame_indices(60, 7), [0, 1, 2, 59], [11, 12, 13]]:
        frames = decode_frames(data, indices, size)
        assert len(frames) == len(indices)
        for frame, index in zip(frames, indices):
            assert frame.dtype == torch.uint8 and tuple(frame.shape) == (3, size[1], size[0])
            matches = [j for j, ref in enumerate(reference) if np.array_equal(frame.numpy(), ref)]
            assert matches == [index], f"{ext}: asked frame {index}, got {matches}"


@pytest.fixture
def decoded_frames(monkeypatch):
    """Timestamps of every frame Energon's readers pull from PyAV's decoder."""
    decoded = []
    original_init = av_reader.AVReader.__init__

    def counting_init(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        frames = self.frame_iterator

        def counted():
            for frame in frames:
                decoded.append(frame.pts)
                yield frame

        self.frame_iterator = counted()

    monkeypatch.setattr(av_reader.AVReader, "__init__", counting_init)
    return decoded


@pytest.mark.parametrize("ext", ["mp4", "mkv", "webm", "avi"])
def test_sampling_seeks_instead_of_decoding_the_whole_video(ext, decoded_frames):
    data = _video(ext, num_frames=240, keyint=16)
    decode_frames(data, list(range(240)))
    assert len(decoded_frames) == 240, "the counter sees every decoded frame"
    decoded_frames.clear()
    frames = decode_frames(data, uniform_frame_indices(240, 4))
    assert len(frames) == 4
    # Each sampled frame costs at most one keyframe interval of decoding.
    assert 4 <= len(decoded_frames) <= 4 * 16, decoded_frames


def test_energon_decoder_alone_decodes_matroska_from_the_start(decoded_frames):
    """Why ``SeekingAVDecoder`` exists: Energon's own index for mkv holds one keyframe."""
    import io

    from megatron.energon.av import AVDecoder

    data = _video("mkv", num_frames=240, keyint=16)
    indices = uniform_frame_indices(240, 4)  # [30, 90, 150, 210]
    AVDecoder(io.BytesIO(data), suppress_warnings=True).get_video_clips(
        [(i, i) for i in indices], video_unit="frames"
    )
    assert len(decoded_frames) >= indices[-1]


def test_fewer_frames_than_asked_and_fps_sampling():
    data = _video("mp4", num_frames=5, keyint=4)
    info = probe_video(data)
    assert info.num_frames == 5
    indices = uniform_frame_indices(info.num_frames, 8)
    assert indices == [0, 1, 2, 3, 4]
    assert len(decode_frames(data, indices)) == 5
    long = probe_video(_video("mp4"))  # 60 frames at 8 fps = 7.5 s
    assert frames_to_sample(long, num_frames=8) == 8
    assert frames_to_sample(long, num_frames=8, fps=2.0) == 15
    assert frames_to_sample(long, num_frames=8, fps=30.0, max_frames=20) == 20


@pytest.mark.parametrize(
    "damage", ["random bytes", "empty", "first half of an mp4", "mp4 without its end"]
)
def test_unreadable_videos_raise_a_decode_error(damage):
    good = _video("mp4")
    data = {
        "random bytes": np.random.default_rng(0).bytes(5000),
        "empty": b"",
        "first half of an mp4": good[: len(good) // 2],
        "mp4 without its end": good[:-200],
    }[damage]
    with pytest.raises(VideoDecodeError):
        check_video_readable(data)


def test_pad_and_crop_place_and_normalize_frames_exactly():
    mean, std = (0.48, 0.45, 0.40), (0.27, 0.26, 0.28)
    rng = np.random.default_rng(0)

    def normalized(x):
        return (x / 255.0 - np.array(mean)[:, None, None]) / np.array(std)[:, None, None]

    wide = rng.integers(0, 256, size=(3, 16, 32), dtype=np.uint8)  # h=16, w=32
    assert scaled_size(32, 16, 32, "pad") == (32, 16)
    padded = to_tower_input([torch.from_numpy(wide)], 32, "pad", mean, std)[0].numpy()
    expected = np.zeros((3, 32, 32))
    expected[:, 8:24, :] = normalized(wide)
    np.testing.assert_allclose(padded, expected, atol=1e-6)

    tall = rng.integers(0, 256, size=(3, 48, 32), dtype=np.uint8)  # h=48, w=32
    assert scaled_size(32, 48, 32, "crop") == (32, 48)
    cropped = to_tower_input([torch.from_numpy(tall)] * 2, 32, "crop", mean, std)
    assert cropped.shape == (2, 3, 32, 32) and cropped.dtype == torch.float32
    np.testing.assert_allclose(cropped[1].numpy(), normalized(tall[:, 8:40, :]), atol=1e-6)

    # What the loader delivers (uint8, cropped but not padded) normalizes to the same input.
    cases = (([torch.from_numpy(wide)], "pad"), ([torch.from_numpy(tall)] * 2, "crop"))
    for frames, mode in cases:
        delivered = fit_frames(frames, 32, mode)
        assert delivered.dtype == torch.uint8
        assert delivered.shape == ((1, 3, 16, 32) if mode == "pad" else (2, 3, 32, 32))
        np.testing.assert_array_equal(
            to_tower_input(delivered, 32, "pad", mean, std).numpy(),
            to_tower_input(frames, 32, mode, mean, std).numpy(),
        )

    assert scaled_size(1280, 720, 448, "pad") == (448, 252)
    assert scaled_size(1280, 720, 448, "crop") == (796, 448)
    assert scaled_size(720, 1280, 448, "crop") == (448, 796)
