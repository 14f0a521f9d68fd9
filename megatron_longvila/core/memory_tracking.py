"""Bytes of tensors allocated inside a block of code: now, and at the peak.

On GPUs this is the CUDA caching allocator's own accounting (``memory_allocated`` /
``max_memory_allocated``) relative to the start of the block. The CPU allocator keeps no
statistics, so on the CPU a dispatch-level tracker follows the storages of the tensors that ops
create inside the block (outputs of collectives included) and counts those still alive; the
peak counts storages at the size they were created with (an upper bound where storages shrink).
"""

from __future__ import annotations

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class _CpuTensorBytes(TorchDispatchMode):
    """Bytes of CPU tensor storages created inside the mode and still alive; and their peak."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.current = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for key in [k for k, (ref, _) in self.live.items() if ref.expired()]:
            self.current -= self.live.pop(key)[1]
        # Views and in-place results of tensors from before the block (parameters) are not new.
        inputs = {
            t.untyped_storage()._cdata
            for t in tree_flatten((args, kwargs))[0]
            if isinstance(t, torch.Tensor) and t.device.type == "cpu"
        }
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                storage = t.untyped_storage()
                # Keyed by the storage itself, not its address: a storage resized to nothing
                # frees its address for the next one while it stays alive.
                key = storage._cdata
                if key not in self.live and key not in inputs and storage.nbytes():
                    self.live[key] = (StorageWeakRef(storage), storage.nbytes())
                    self.current += storage.nbytes()
        self.peak = max(self.peak, self.current)
        return out

    def resident(self) -> int:
        """Bytes the live storages hold now. Differs from ``current`` where a storage was
        resized after its creation (megatron-core frees recomputable outputs that way)."""
        total = 0
        for ref, _ in self.live.values():
            if not ref.expired():
                total += torch.UntypedStorage._new_with_weak_ptr(ref.cdata).nbytes()
        return total


class TensorMemoryMeter:
    """``with TensorMemoryMeter(device) as meter: ...`` then ``meter.current`` / ``meter.peak``:
    bytes allocated inside the block beyond what was allocated at its start (readable inside the
    block too)."""

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.cuda = torch.device(device).type == "cuda"
        self._cpu = None if self.cuda else _CpuTensorBytes()
        self._base = 0

    def __enter__(self) -> TensorMemoryMeter:
        if self.cuda:
            torch.cuda.synchronize()
            self._base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        else:
            self._cpu.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.cuda:
            torch.cuda.synchronize()
        else:
            self._cpu.__exit__(*exc)

    @property
    def current(self) -> int:
        if self.cuda:
            return torch.cuda.memory_allocated() - self._base
        return self._cpu.resident()

    @property
    def peak(self) -> int:
        if self.cuda:
            return torch.cuda.max_memory_allocated() - self._base
        return self._cpu.peak
