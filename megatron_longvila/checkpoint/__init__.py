"""What a checkpoint is: its folder layout, its recorded train state, safe loading, save/load.

Every layer that reads or writes checkpoints (training, inference, conversion, evaluation) goes
through this package.
"""

from megatron_longvila.checkpoint.layout import CheckpointError, resolve_checkpoint_dir
from megatron_longvila.checkpoint.manager import CheckpointManager, load_model_weights

__all__ = ["CheckpointError", "CheckpointManager", "load_model_weights", "resolve_checkpoint_dir"]
