"""An evaluation's JSON file: its settings, one record per finished item, and a summary.

::

    {"eval": "needle", "settings": {...}, "records": {"<item key>": {...}, ...},
     "summary": {...}, "complete": true}

The file is rewritten atomically (a temporary file renamed over it) after every item, so a run
that stops half-way leaves a valid file; started again with the same settings it skips the
items already recorded. Under torch.distributed every rank runs every item (MM-SP: all ranks
of a group serve one prompt) and only rank 0 reads and writes the file; the records found are
broadcast so that all ranks skip the same items.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import torch.distributed as dist
from tqdm import tqdm

T = TypeVar("T")


def is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _broadcast_from_rank0(value: Any) -> Any:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def write_json_atomic(path: Path, data: Any) -> None:
    """Write ``data`` as JSON to ``path`` so that a reader never sees a partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _as_json(value: Any) -> Any:
    """``value`` as it reads back from JSON (tuples become lists, keys strings)."""
    return json.loads(json.dumps(value))


def _flatten(settings: dict, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}, so that a mismatch names the very setting."""
    flat = {}
    for key, value in settings.items():
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


class SettingsMismatch(ValueError):
    """A results file made with other settings than the run that wants to resume it."""


class ResultsFile:
    """Records of one evaluation run; see the module docstring.

    resume: False starts over (an existing file is replaced at the first write).
    """

    def __init__(self, path: str | Path, eval_name: str, settings: dict, resume: bool = True):
        self.path = Path(path)
        self.eval_name = eval_name
        self.settings = _as_json(settings)
        self.records: dict[str, dict] = {}
        self.summary: dict = {}
        found, problem = {}, None
        if is_rank0() and resume and self.path.exists():
            try:
                found = self._load_existing()
            except ValueError as exc:  # every rank must stop, not wait for the records
                problem = exc
        self.records, problem = _broadcast_from_rank0((found, problem))
        if problem is not None:
            raise problem

    def _load_existing(self) -> dict[str, dict]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ValueError(f"cannot resume from {self.path}: not valid JSON ({exc})") from exc
        if data.get("eval") != self.eval_name:
            raise SettingsMismatch(
                f"{self.path} holds a {data.get('eval')!r} evaluation, not {self.eval_name!r}"
            )
        old, new = _flatten(data.get("settings", {})), _flatten(self.settings)
        differ = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        if differ:
            shown = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in differ)
            raise SettingsMismatch(
                f"{self.path} was made with other settings ({shown}); pass a new output path "
                f"or start over without resuming"
            )
        return dict(data.get("records", {}))

    def done(self, key: str) -> bool:
        return key in self.records

    def add(self, key: str, record: dict) -> None:
        """Record one finished item and rewrite the file (rank 0)."""
        self.records[key] = _as_json(record)
        self._write(complete=False)

    def finish(self, summary: dict) -> None:
        """Store the summary and mark the run complete."""
        self.summary = _as_json(summary)
        self._write(complete=True)

    def _write(self, complete: bool) -> None:
        if not is_rank0():
            return
        data = {
            "eval": self.eval_name,
            "settings": self.settings,
            "records": self.records,
            "summary": self.summary,
            "complete": complete,
        }
        write_json_atomic(self.path, data)


def progress(items: Iterable[T], total: int, desc: str) -> Iterator[T]:
    """``items`` with a progress bar on rank 0 only."""
    yield from tqdm(items, total=total, desc=desc, disable=not is_rank0(), dynamic_ncols=True)
