"""Where a conversion writes: never over existing files unless asked, never half-written."""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterable, Iterator
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


@contextlib.contextmanager
def staged_output(
    output: str | Path, force: bool, inputs: Iterable[str | Path] = ()
) -> Iterator[Path]:
    """An empty staging folder beside ``output`` (see :func:`check_output`) that takes its place
    when the block ends; if the block fails, the staging folder goes and ``output`` stays as it
    was. Failures to write come out as :class:`ConversionError` naming the file."""
    output = check_output(output, force, inputs)
    staging = output.with_name(f".{output.name}.partial-{os.getpid()}")
    previous = output.with_name(f".{output.name}.replaced-{os.getpid()}")
    try:
        try:
            output.parent.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir()
            yield staging
            if output.exists():
                os.rename(output, previous)
            try:
                os.rename(staging, output)
            except OSError:
                if previous.exists():
                    os.rename(previous, output)
                raise
        except OSError as error:
            raise ConversionError(f"cannot write {output}: {describe_os_error(error)}") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(previous, ignore_errors=True)


def describe_os_error(error: OSError) -> str:
    """``reason (file)``: what failed and, where the error knows it, on which file."""
    reason = error.strerror or str(error)
    return f"{reason} ({error.filename})" if error.filename else reason
