"""Where a conversion writes: never over existing files unless asked."""

from __future__ import annotations

import shutil
from collections.abc import Iterable
from pathlib import Path

from megatron_longvila.convert.hf_mapping import ConversionError


def check_output(output: str | Path, force: bool, inputs: Iterable[str | Path] = ()) -> Path:
    """``output`` resolved, if a conversion may write there: missing or empty, or with
    ``force`` anything but a folder that is, or holds, one of the ``inputs``."""
    output = Path(output).resolve()
    if output.exists() and not output.is_dir():
        raise ConversionError(f"output {output} exists and is not a folder")
    if output.is_dir() and any(output.iterdir()):
        if not force:
            raise ConversionError(
                f"output {output} exists and is not empty; pass --force (force=True) to replace it"
            )
        for source in inputs:
            source = Path(source).resolve()
            if source == output or output in source.parents:
                raise ConversionError(f"output {output} holds the input {source}; not replacing it")
    return output


def prepare_output(output: str | Path, force: bool, inputs: Iterable[str | Path] = ()) -> Path:
    """An empty ``output`` folder (see :func:`check_output`; with ``force`` its content goes)."""
    output = check_output(output, force, inputs)
    if output.is_dir() and any(output.iterdir()):
        shutil.rmtree(output)
    output.mkdir(parents=True, exist_ok=True)
    return output
