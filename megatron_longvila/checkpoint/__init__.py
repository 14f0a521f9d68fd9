"""What a checkpoint is: its folder layout, its recorded train state, safe loading, save/load.

Every layer that reads or writes checkpoints (training, inference, conversion, evaluation) goes
through this package. Importing it (or :mod:`.layout`) does not import torch: config checks read
checkpoint folders before anything heavy loads; the manager comes in on first use.
"""

from typing import Any

from megatron_longvila.checkpoint.layout import CheckpointError, resolve_checkpoint_dir

__all__ = ["CheckpointError", "CheckpointManager", "load_model_weights", "resolve_checkpoint_dir"]


def __getattr__(name: str) -> Any:
    if name in ("CheckpointManager", "load_model_weights"):
        from megatron_longvila.checkpoint import manager

        return getattr(manager, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
