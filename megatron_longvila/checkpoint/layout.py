"""Where a checkpoint lives on disk, and how a path names one.

A checkpoint root::

    root/
      iter_0000008/              complete: dist checkpoint + train_state.json + rank_*.safetensors
      iter_0000012.partial/      being written (or left behind by a crash): never loaded
      latest                     text file naming the newest complete checkpoint

A path names a checkpoint when it is a root (its ``latest``, else its newest complete
``iter_NNNNNNN``) or one dist checkpoint folder (``.metadata`` inside).
"""

from __future__ import annotations

import re
from pathlib import Path

LATEST = "latest"
TRAIN_STATE = "train_state.json"
METADATA = ".metadata"
PARTIAL_SUFFIX = ".partial"
_ITER_RE = re.compile(r"^iter_(\d{7})$")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or not loadable."""


def iteration_dir_name(step: int) -> str:
    return f"iter_{step:07d}"


def rank_file_name(rank: int) -> str:
    return f"rank_{rank:05d}.safetensors"


def is_dist_checkpoint(path: Path) -> bool:
    return (path / METADATA).is_file()


def complete_steps(root: Path) -> list[int]:
    """Steps of the complete ``iter_NNNNNNN`` folders under ``root``, ascending."""
    if not root.is_dir():
        return []
    steps = []
    for child in root.iterdir():
        match = _ITER_RE.match(child.name)
        if match and (child / TRAIN_STATE).is_file():
            steps.append(int(match.group(1)))
    return sorted(steps)


def latest_dir(root: Path) -> Path | None:
    """The checkpoint ``latest`` points to; falls back to the newest complete one."""
    pointer = root / LATEST
    if pointer.is_file():
        candidate = root / pointer.read_text(encoding="utf-8").strip()
        if (candidate / TRAIN_STATE).is_file():
            return candidate
    steps = complete_steps(root)
    return root / iteration_dir_name(steps[-1]) if steps else None


def resolve_checkpoint_dir(path: str | Path) -> Path:
    """The dist checkpoint folder named by ``path``: itself, or a root's latest checkpoint."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint path {path} does not exist")
    if path.name.endswith(PARTIAL_SUFFIX):
        latest = latest_dir(path.parent)
        hint = f"; the newest complete one there is {latest}" if latest else ""
        raise CheckpointError(
            f"{path} is an unfinished checkpoint (a save that was interrupted or is still "
            f"running): it is never loaded{hint}"
        )
    if is_dist_checkpoint(path):
        return path
    latest = latest_dir(path)
    if latest is None:
        partial = sorted(p.name for p in path.glob(f"*{PARTIAL_SUFFIX}")) if path.is_dir() else []
        hint = f" (only unfinished saves: {', '.join(partial)})" if partial else ""
        raise CheckpointError(
            f"{path} holds no checkpoint: neither a dist checkpoint folder ({METADATA}) nor a "
            f"checkpoint root with a complete iter_NNNNNNN folder{hint}"
        )
    return latest
