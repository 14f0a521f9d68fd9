"""The training loader: Energon's savable loader over our task encoder, for one DP replica.

Rank mapping: the caller passes the data-parallel rank and size explicitly (from
megatron-core's ``parallel_state.get_data_parallel_rank()`` / ``_world_size()``). Every rank of
one SP/TP/PP group passes the same ``dp_rank`` and therefore reads the same samples in the same
order; different DP replicas read disjoint slices of the shards; the order depends only on the
data, ``seed``, ``dp_size`` and ``num_workers``.

State: :meth:`TrainLoader.state_dict` returns plain JSON types (see ``loader_state``) holding
Energon's ``save_state_rank()``; :meth:`TrainLoader.load_state_dict` on a loader built with the
same config and DP position continues with exactly the samples that had not been yielded.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from typing import Any

import torch
from megatron.energon import WorkerConfig, get_savable_loader, get_train_dataset

from megatron_longvila.data.batch import MultimodalBatch
from megatron_longvila.data.chat_template import get_template
from megatron_longvila.data.config import DataConfig
from megatron_longvila.data.loader_state import decode_state, encode_state
from megatron_longvila.data.sample_issues import SampleIssues
from megatron_longvila.data.task_encoder import LongVILATaskEncoder
from megatron_longvila.data.tokenizer import TextTokenizer, load_tokenizer

STATE_FORMAT = "megatron_longvila.data.loader/1"
_PIN_MEMORY_WARNING = "'pin_memory' argument is set as true but no accelerator is found"


class TrainLoader:
    """Iterates MultimodalBatches for data-parallel replica ``dp_rank`` of ``dp_size``."""

    def __init__(
        self,
        config: DataConfig,
        dp_rank: int,
        dp_size: int,
        tokenizer: TextTokenizer | None = None,
        checkpoint_every_sec: float = 60.0,
    ) -> None:
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank={dp_rank} must be in [0, dp_size={dp_size})")
        self.config = config
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.tokenizer = tokenizer or load_tokenizer(
            config.tokenizer_path, get_template(config.chat_template).markers
        )
        self.issues = SampleIssues(config.max_consecutive_skips)
        encoder = LongVILATaskEncoder(config, self.tokenizer, self.issues)
        worker_config = WorkerConfig(
            rank=dp_rank,
            world_size=dp_size,
            num_workers=config.num_workers,
            seed_offset=config.seed,
            global_error_handler=self.issues.handle_error,
        )
        dataset = get_train_dataset(
            config.dataset_path,
            split_part=config.split_part,
            worker_config=worker_config,
            batch_size=config.micro_batch_size,
            packing_buffer_size=config.packing_buffer_size if config.packing else None,
            shuffle_buffer_size=config.shuffle_buffer_size or None,
            max_samples_per_sequence=config.max_samples_per_sequence,
            task_encoder=encoder,
            repeat=config.repeat,
        )
        self._loader = get_savable_loader(dataset, checkpoint_every_sec=checkpoint_every_sec)
        if not torch.cuda.is_available():
            # Energon always asks torch's DataLoader for pinned memory; without a GPU torch warns
            # on every epoch that it cannot pin. Silence exactly that message.
            warnings.filterwarnings("ignore", message=_PIN_MEMORY_WARNING, category=UserWarning)

    def __iter__(self) -> Iterator[MultimodalBatch]:
        return iter(self._loader)

    def __len__(self) -> int:
        """Batches per epoch on this replica (Energon's estimate; exact without packing)."""
        return len(self._loader)

    def issue_counts(self) -> dict[str, int]:
        """How many samples were skipped or adapted, per kind (see ``sample_issues.ISSUES``)."""
        return self.issues.counts()

    def _identity(self) -> dict[str, Any]:
        c = self.config
        return {
            "dataset_path": str(c.dataset_path),
            "split_part": c.split_part,
            "dp_rank": self.dp_rank,
            "dp_size": self.dp_size,
            "num_workers": c.num_workers,
            "seed": c.seed,
            "micro_batch_size": c.micro_batch_size,
            "packing": c.packing,
        }

    def state_dict(self) -> dict[str, Any]:
        """The exact position of this loader, as JSON types (safe for ``json.dump`` and for
        ``torch.save`` / ``torch.load(weights_only=True)``)."""
        return {
            "format": STATE_FORMAT,
            "identity": self._identity(),
            "energon": encode_state(self._loader.save_state_rank()),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state`` (call before iterating)."""
        if state.get("format") != STATE_FORMAT:
            raise ValueError(
                f"not a loader state of format {STATE_FORMAT}: {state.get('format')!r}"
            )
        mine = self._identity()
        changed = {k: (v, mine.get(k)) for k, v in state["identity"].items() if mine.get(k) != v}
        if changed:
            detail = ", ".join(f"{k}: saved {a!r}, now {b!r}" for k, (a, b) in changed.items())
            raise ValueError(f"loader state was saved with a different setup ({detail})")
        self._loader.restore_state_rank(decode_state(state["energon"]))


def build_train_loader(
    config: DataConfig,
    dp_rank: int,
    dp_size: int,
    tokenizer: TextTokenizer | None = None,
    checkpoint_every_sec: float = 60.0,
) -> TrainLoader:
    """The training loader of data-parallel replica ``dp_rank`` of ``dp_size``; see module doc."""
    return TrainLoader(config, dp_rank, dp_size, tokenizer, checkpoint_every_sec)


def loader_state(loader: TrainLoader) -> dict[str, Any]:
    """JSON-typed state of ``loader`` for the trainer's checkpoint."""
    return loader.state_dict()


def restore_loader_state(loader: TrainLoader, state: dict[str, Any]) -> None:
    """Restore a state returned by :func:`loader_state` into a freshly built loader."""
    loader.load_state_dict(state)
