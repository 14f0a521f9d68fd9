"""Loader state <-> JSON without pickle: round trip of every value type Energon's states hold,
and refusal of classes that are not Energon state classes. Reference: the original objects
(exact equality, tensors bit for bit)."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from megatron.energon.rng import SystemRng
from megatron.energon.savable_loader import SavableDatasetCheckpoint, SavableDatasetState
from megatron.energon.state import FlexState

from megatron_longvila.data.loader_state import decode_state, encode_state


def test_energon_state_values_survive_json_exactly():
    random.seed(3)
    np.random.seed(3)
    torch.manual_seed(3)
    state = SavableDatasetCheckpoint(
        state=SavableDatasetState(
            rng=SystemRng.save_state(),
            dataset_state=FlexState(
                nested=[("Webdataset", 7, (1, "a")), {"k": b"\x00\xffbytes"}],
                counts=np.int64(5),
                array=np.arange(6, dtype=np.uint32).reshape(2, 3),
                half=torch.tensor([1.5, -2.25], dtype=torch.bfloat16),
                none=None,
                flag=True,
                ratio=0.125,
                intkeys={3: "x", (1, 2): "y"},
            ),
            sample_index=11,
        ),
        offset=2,
    )
    restored = decode_state(json.loads(json.dumps(encode_state(state))))
    assert isinstance(restored, SavableDatasetCheckpoint) and restored.offset == 2
    inner = restored.state
    assert isinstance(inner.dataset_state, FlexState) and inner.sample_index == 11
    flex = inner.dataset_state
    assert flex["nested"] == [("Webdataset", 7, (1, "a")), {"k": b"\x00\xffbytes"}]
    assert flex["counts"] == 5 and flex["counts"].dtype == np.int64
    np.testing.assert_array_equal(flex["array"], np.arange(6, dtype=np.uint32).reshape(2, 3))
    assert flex["array"].dtype == np.uint32
    assert torch.equal(flex["half"], torch.tensor([1.5, -2.25], dtype=torch.bfloat16))
    assert (flex["none"], flex["flag"], flex["ratio"]) == (None, True, 0.125)
    assert flex["intkeys"] == {3: "x", (1, 2): "y"}
    # The RNG state restores the same random streams.
    SystemRng.restore_state(inner.rng)
    after = (random.random(), np.random.rand(), torch.rand(1).item())
    SystemRng.restore_state(state.state.rng)
    assert after == (random.random(), np.random.rand(), torch.rand(1).item())


def test_decoding_refuses_classes_that_are_not_energon_states():
    forged = {"t": "obj", "v": {"class": "os:system", "fields": {}}}
    with pytest.raises(ValueError, match="not an allowed state class"):
        decode_state(forged)
    with pytest.raises(ValueError, match="malformed"):
        decode_state({"t": "tuple"})
    with pytest.raises(TypeError, match="cannot encode"):
        encode_state(object())
