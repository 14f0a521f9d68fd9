"""Loading never unpickles arbitrary objects.

megatron-core's torch_dist format holds pickles in three places, and each is read safely:

* ``.metadata`` is read with an allow-list unpickler before megatron-core reads it: only torch's
  and megatron's checkpoint metadata classes, dtypes and a few builtins resolve, never a function
  to call (:func:`verify_checkpoint_metadata`).
* Byte entries inside the ``__*.distcp`` files (the layers' ``_extra_state`` and other sharded
  objects), which torch's ``DefaultLoadPlanner.load_bytes`` would read with
  ``torch.load(weights_only=False)``, go through :class:`SafeLoadPlanner`
  (``weights_only=True``); a refused entry is named with its file.
* ``common.pt`` is read with ``weights_only=True``.

Every load of a dist checkpoint goes through :func:`load_dist_checkpoint` (or, without a process
group, :class:`SafeLoadPlanner` directly); our own files are JSON and safetensors.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import io
import os
import pickle
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.strategies import torch as mcore_torch_strategy
from megatron.core.dist_checkpointing.strategies.common import (
    COMMON_STATE_FNAME,
    TorchCommonLoadStrategy,
)
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.planner import ReadItem

from megatron_longvila.checkpoint.layout import METADATA, CheckpointError

_SAFE_MODULE_PREFIXES = (
    "torch.distributed.checkpoint.",
    "megatron.core.dist_checkpointing.",
)
_SAFE_GLOBALS = {
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("collections", "OrderedDict"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
    ("builtins", "slice"),
}


class _AllowListUnpickler(pickle.Unpickler):
    """Resolves only metadata classes of torch's checkpoint format, dtypes and a few builtins."""

    def find_class(self, module: str, name: str) -> Any:
        obj = super().find_class(module, name) if self._allowed(module, name) else None
        if obj is None:
            raise CheckpointError(
                f"checkpoint metadata refers to {module}.{name}, which is not an allowed type"
            )
        return obj

    @staticmethod
    def _allowed(module: str, name: str) -> bool:
        if (module, name) in _SAFE_GLOBALS:
            return True
        if module == "torch":
            return isinstance(getattr(torch, name, None), torch.dtype)
        if module.startswith(_SAFE_MODULE_PREFIXES):
            # Classes only (metadata dataclasses and enums): never a function to call.
            return isinstance(getattr(importlib.import_module(module), name, None), type)
        return False


def verify_checkpoint_metadata(directory: str | Path) -> None:
    """Refuse a torch_dist checkpoint whose pickled ``.metadata`` holds anything but metadata."""
    path = Path(directory) / METADATA
    if not path.is_file():
        raise CheckpointError(f"{directory} is not a complete dist checkpoint (no {METADATA})")
    with path.open("rb") as handle:
        _AllowListUnpickler(io.BufferedReader(handle)).load()


class SafeLoadPlanner(mcore_torch_strategy.MCoreLoadPlanner):
    """megatron-core's load planner, reading byte entries with ``torch.load(weights_only=True)``.

    Plain data (tensors, numbers, strings, containers, ``None``) loads as before; an entry that
    asks for any other global is refused with a :class:`CheckpointError` naming its file and key.
    """

    def __init__(self, *args: Any, directory: str | Path = "", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.directory = Path(directory)

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        fqn = read_item.dest_index.fqn
        try:
            obj = torch.load(value, map_location="cpu", weights_only=True)
        except Exception as error:  # whatever fails, the entry is not plain data
            storage = self.metadata.storage_data[read_item.storage_index]
            raise CheckpointError(
                f"{self.directory / storage.relative_path}: entry {fqn!r} is not plain data "
                f"({_unpickling_problem(error)}); refusing to load it"
            ) from None
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[fqn], obj)
        else:
            self.state_dict[fqn] = obj


def _unpickling_problem(error: Exception) -> str:
    """The gist of torch's weights-only refusal (its message wraps it in a page of advice)."""
    text = str(error)
    found = re.search(r"GLOBAL ([\w.]+)", text)
    if found:
        return f"it asks for {found.group(1)}"
    details = [part.strip() for part in re.split(r"\n\s*\n|WeightsUnpickler error:", text)]
    details = [part for part in details[1:] if part and not part.startswith("Check the doc")]
    return details[0].splitlines()[0] if details else text.splitlines()[0] or type(error).__name__


class _SafeCommonLoadStrategy(TorchCommonLoadStrategy):
    """``common.pt`` read with ``weights_only=True`` whatever torch's default or environment."""

    def load_common(self, checkpoint_dir: str | Path) -> dict[str, Any]:
        path = os.path.join(checkpoint_dir, COMMON_STATE_FNAME)
        if not os.path.isfile(path):
            raise CheckpointError(f"{checkpoint_dir} is not a complete dist checkpoint (no {path})")
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as error:
            raise CheckpointError(
                f"{path} is not plain data ({_unpickling_problem(error)}); refusing to load it"
            ) from None


class _SafeTorchDistLoadStrategy(mcore_torch_strategy.TorchDistLoadShardedStrategy):
    """megatron-core's torch_dist load with :class:`SafeLoadPlanner` as its planner."""

    def load(self, sharded_state_dict: dict[str, Any], checkpoint_dir: Path) -> dict[str, Any]:
        planner = functools.partial(SafeLoadPlanner, directory=checkpoint_dir)
        with _mcore_load_planner(planner):
            return super().load(sharded_state_dict, checkpoint_dir)


@contextlib.contextmanager
def _mcore_load_planner(factory: Callable[..., SafeLoadPlanner]) -> Iterator[None]:
    # TorchDistLoadShardedStrategy.load builds its planner inline from the module-level name.
    original = mcore_torch_strategy.MCoreLoadPlanner
    mcore_torch_strategy.MCoreLoadPlanner = factory
    try:
        yield
    finally:
        mcore_torch_strategy.MCoreLoadPlanner = original


def load_dist_checkpoint(
    sharded_state_dict: dict[str, Any], directory: str | Path
) -> dict[str, Any]:
    """``dist_checkpointing.load`` with every pickle of the checkpoint read safely (see module).

    Raises :class:`CheckpointError` naming the file (and entry) that holds anything but data.
    """
    verify_checkpoint_metadata(directory)
    try:
        return dist_checkpointing.load(
            sharded_state_dict,
            str(directory),
            sharded_strategy=_SafeTorchDistLoadStrategy(),
            common_strategy=_SafeCommonLoadStrategy(),
        )
    except CheckpointException as error:  # torch gathers every rank's failure into one
        refusals = [exc for exc, _ in error.failures.values() if isinstance(exc, CheckpointError)]
        if refusals:
            raise refusals[0] from None
        raise
