"""Energon loader state <-> plain JSON types, without pickle.

``SavableDataLoader.save_state_rank()`` returns Energon dataclasses holding dicts, tuples, bytes,
torch/numpy RNG states and numpy scalars. :func:`encode_state` turns that tree into JSON values;
:func:`decode_state` rebuilds it, constructing only the Energon state classes listed in
:data:`STATE_CLASSES` (anything else in a state file is rejected), so loading a state never runs
code chosen by the file.

Encoding: JSON primitives and lists stay as they are; every other value is ``{"t": tag, "v":
payload}`` with tags ``tuple``, ``dict`` (list of key/value pairs), ``bytes`` (base64),
``tensor`` / ``ndarray`` (dtype, shape, base64 of the raw little-endian buffer), ``npscalar``,
and ``obj`` (class name + fields).
"""

from __future__ import annotations

import base64
import dataclasses
import importlib
from typing import Any

import numpy as np
import torch

#: Classes a state may contain, by "module:qualname".
STATE_CLASSES = (
    "megatron.energon.savable_loader:SavableDataLoaderState",
    "megatron.energon.savable_loader:SavableDatasetCheckpoint",
    "megatron.energon.savable_loader:SavableDatasetState",
    "megatron.energon.rng:SystemRngState",
    "megatron.energon.flavors.webdataset.sample_loader:SliceState",
    "megatron.energon.state:FlexState",
)


def _class_name(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


def _load_class(name: str) -> type:
    if name not in STATE_CLASSES:
        raise ValueError(f"loader state names class {name!r}, which is not an allowed state class")
    module, qualname = name.split(":")
    return getattr(importlib.import_module(module), qualname)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def encode_state(value: Any) -> Any:
    """Energon state -> JSON-compatible value."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, list):
        return [encode_state(v) for v in value]
    if isinstance(value, tuple):
        return {"t": "tuple", "v": [encode_state(v) for v in value]}
    if isinstance(value, (bytes, bytearray)):
        return {"t": "bytes", "v": _b64(bytes(value))}
    if isinstance(value, torch.Tensor):
        array = value.detach().cpu().contiguous()
        return {
            "t": "tensor",
            "v": {
                "dtype": str(array.dtype).removeprefix("torch."),
                "shape": list(array.shape),
                "data": _b64(array.view(torch.uint8).numpy().tobytes()),
            },
        }
    if isinstance(value, np.ndarray):
        array = np.ascontiguousarray(value)
        return {
            "t": "ndarray",
            "v": {
                "dtype": array.dtype.newbyteorder("<").str,
                "shape": list(array.shape),
                "data": _b64(array.astype(array.dtype.newbyteorder("<")).tobytes()),
            },
        }
    if isinstance(value, np.generic):
        return {"t": "npscalar", "v": {"dtype": value.dtype.str, "value": value.item()}}
    name = _class_name(type(value))
    if name in STATE_CLASSES:
        if isinstance(value, dict):
            fields = {"items": encode_state(dict(value))}
        else:
            fields = {
                f.name: encode_state(getattr(value, f.name)) for f in dataclasses.fields(value)
            }
        return {"t": "obj", "v": {"class": name, "fields": fields}}
    if isinstance(value, dict):
        return {"t": "dict", "v": [[encode_state(k), encode_state(v)] for k, v in value.items()]}
    raise TypeError(f"cannot encode a {name} in a loader state")


def decode_state(value: Any) -> Any:
    """Inverse of :func:`encode_state`."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, list):
        return [decode_state(v) for v in value]
    if not isinstance(value, dict) or set(value) != {"t", "v"}:
        raise ValueError(f"malformed loader state value: {str(value)[:200]}")
    tag, payload = value["t"], value["v"]
    if tag == "tuple":
        return tuple(decode_state(v) for v in payload)
    if tag == "dict":
        return {decode_state(k): decode_state(v) for k, v in payload}
    if tag == "bytes":
        return base64.b64decode(payload)
    if tag == "tensor":
        dtype = getattr(torch, payload["dtype"])
        raw = bytearray(base64.b64decode(payload["data"]))
        flat = (
            torch.frombuffer(raw, dtype=torch.uint8) if raw else torch.empty(0, dtype=torch.uint8)
        )
        return flat.view(dtype).reshape(payload["shape"]).clone()
    if tag == "ndarray":
        raw = base64.b64decode(payload["data"])
        array = np.frombuffer(raw, dtype=np.dtype(payload["dtype"])).reshape(payload["shape"])
        return array.astype(array.dtype.newbyteorder("=")).copy()
    if tag == "npscalar":
        return np.dtype(payload["dtype"]).type(payload["value"])
    if tag == "obj":
        cls = _load_class(payload["class"])
        fields = {k: decode_state(v) for k, v in payload["fields"].items()}
        if issubclass(cls, dict):
            return cls(fields["items"])
        return cls(**fields)
    raise ValueError(f"unknown loader state tag {tag!r}")
