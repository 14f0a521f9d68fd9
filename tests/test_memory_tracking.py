"""TensorMemoryMeter on CPU counts the storages created inside its block that are still alive.

Reference: the byte sizes of the tensors the test allocates and frees (exact).
"""

from __future__ import annotations

import torch

from megatron_longvila.core.memory_tracking import TensorMemoryMeter


def test_cpu_meter_follows_live_tensors_and_their_peak():
    before = torch.ones(1000)  # allocated outside the block: never counted
    with TensorMemoryMeter("cpu") as meter:
        a = torch.empty(1000)  # 4000 bytes
        b = before * 2  # 4000 bytes
        assert meter.current == 8000
        del a
        c = torch.empty(250, dtype=torch.float64)  # 2000 bytes; the next op notices `a` is gone
        assert meter.current == 6000
        view = b[:10]  # a view shares b's storage: nothing new
        assert view.numel() == 10 and c.numel() == 250
        assert meter.current == 6000 and meter.peak == 8000
