"""Read Hugging Face weights: a LongVILA folder, or a plain LLM folder + a plain SigLIP folder.

A LongVILA folder (what :func:`~.hf_export.write_longvila_folder` writes, and the layout of
LongVILA releases) has ``llm/``, ``vision_tower/``, ``mm_projector/`` and a top-level
``config.json``. Plain folders are what ``save_pretrained`` writes for a ``Qwen2ForCausalLM`` /
``LlamaForCausalLM`` and for a ``SiglipVisionModel`` (or a whole ``SiglipModel``, whose text
tower is ignored); the projector is then given separately or freshly initialized.

What the parts' own configs do not say comes from :attr:`HFSource.settings` (top-level
``config.json`` keys, overridable): ``image_token_id`` / ``video_token_id`` (else looked up in
the LLM folder's tokenizer the way the data pipeline registers ``<image>`` / ``<video>``),
``mm_vision_select_layer`` (-2), ``vocab_pad_multiple`` (128), ``max_seq_length``,
``token_order`` (of the projector: see :func:`projector_token_order`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from megatron_longvila.convert.hf_mapping import (
    ConversionError,
    llm_config_from_hf,
    projector_state_to_hf,
    vision_config_from_hf,
)
from megatron_longvila.convert.parts import state_from_hf_parts
from megatron_longvila.convert.safetensors_io import read_safetensors
from megatron_longvila.models.config import LongVILAConfig, ProjectorConfig

LLM_DIR, VISION_DIR, PROJECTOR_DIR = "llm", "vision_tower", "mm_projector"
TOP_CONFIG = "config.json"
PROJECTOR_TYPE = "mlp_downsample"
#: Top-level config keys that VILA's code writes from its Dec 2024 (NVILA) release on; that code
#: orders merged tokens row-major.
NVILA_KEYS = ("dynamic_s2", "image_encoder", "video_encoder")
#: The transformers release (Oct 2024) that VILA moved to with NVILA: a VILA folder saved with an
#: older one comes from the 2024 code (LongVILA's release), which orders them column-major.
NVILA_TRANSFORMERS = (4, 46)
#: Where a user gives the order when a folder cannot tell it.
TOKEN_ORDER_OPTION = "--token-order row_major|column_major (init.token_order in a training config)"


def read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConversionError(f"{path} does not exist")
    return json.loads(path.read_text(encoding="utf-8"))


@dataclass
class HFSource:
    """Where Hugging Face weights come from (see the module docstring)."""

    llm: Path
    vision_tower: Path
    mm_projector: Path | None = None
    settings: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_folder(cls, folder: str | Path, **overrides: Any) -> HFSource:
        """A LongVILA folder; ``overrides`` (None values ignored) replace top-level settings."""
        folder = Path(folder)
        settings = read_json(folder / TOP_CONFIG)
        for part in (LLM_DIR, VISION_DIR):
            if not (folder / part).is_dir():
                raise ConversionError(f"{folder} is not a LongVILA folder: no {part}/ in it")
        projector = folder / PROJECTOR_DIR
        return cls.from_parts(
            folder / LLM_DIR,
            folder / VISION_DIR,
            projector if projector.is_dir() else None,
            **{**settings, **overrides},
        )

    @classmethod
    def from_parts(
        cls,
        llm: str | Path,
        vision_tower: str | Path,
        mm_projector: str | Path | None = None,
        **settings: Any,
    ) -> HFSource:
        """Plain folders; ``settings`` as in a top-level config.json (None values ignored)."""
        return cls(
            Path(llm),
            Path(vision_tower),
            Path(mm_projector) if mm_projector is not None else None,
            {k: v for k, v in settings.items() if v is not None},
        )


def _siglip_vision_config(folder: Path) -> Any:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(folder), local_files_only=True)
    return config.vision_config if config.model_type == "siglip" else config


def _projector_values(source: HFSource) -> dict[str, Any]:
    return read_json(source.mm_projector / TOP_CONFIG) if source.mm_projector else {}


def read_token_order(source: HFSource) -> str:
    """The token order of ``source``'s projector (:func:`projector_token_order`)."""
    return projector_token_order(source, _projector_values(source))


def _projector_config(source: HFSource) -> ProjectorConfig:
    values = _projector_values(source)
    kind = values.get("mm_projector_type", PROJECTOR_TYPE)
    if kind != PROJECTOR_TYPE:
        raise ConversionError(
            f"{source.mm_projector}: mm_projector_type {kind!r} is not {PROJECTOR_TYPE!r}"
        )
    known = {k: values[k] for k in ("layer_norm_eps",) if k in values}
    return ProjectorConfig(token_order=projector_token_order(source, values), **known)


def projector_token_order(source: HFSource, projector: dict[str, Any]) -> str:
    """The order of the merged visual tokens that ``source``'s projector was trained with.

    ``projector`` is its ``config.json``. Taken from, first to last: ``token_order`` in the
    settings (the caller's option or the top-level config), in the projector's config; row-major
    for a fresh projector; row-major when the top-level config has a key of VILA's code from Dec
    2024 on (:data:`NVILA_KEYS`); column-major when the folder was saved with transformers older
    than 4.46 (VILA's 2024 code). Otherwise refused: a wrong order gives wrong visual tokens
    without any error.
    """
    settings = source.settings
    if "token_order" in settings:
        return settings["token_order"]
    if "token_order" in projector:
        return projector["token_order"]
    if source.mm_projector is None:
        return "row_major"
    if any(key in settings for key in NVILA_KEYS):
        return "row_major"
    version = projector.get("transformers_version") or settings.get("transformers_version")
    if version is not None and _release(str(version)) < NVILA_TRANSFORMERS:
        return "column_major"
    raise ConversionError(
        f"{source.mm_projector}: cannot tell the order of the merged visual tokens (VILA's code "
        "of 2024 orders them column-major, its code from Dec 2024 row-major): the folder records "
        f"no token_order, none of {', '.join(NVILA_KEYS)} and no transformers_version before "
        f"{'.'.join(map(str, NVILA_TRANSFORMERS))}; give it with {TOKEN_ORDER_OPTION}"
    )


def _release(version: str) -> tuple[int, int]:
    """``"4.37.2"`` -> ``(4, 37)``."""
    try:
        major, minor = version.split(".")[:2]
        return int(major), int(minor)
    except ValueError:
        raise ConversionError(f"transformers_version {version!r} is not a version") from None


def _media_token_ids(source: HFSource) -> tuple[int, int]:
    settings = source.settings
    if "image_token_id" in settings and "video_token_id" in settings:
        return int(settings["image_token_id"]), int(settings["video_token_id"])
    from megatron_longvila.data.tokenizer import load_tokenizer

    try:
        tokenizer = load_tokenizer(source.llm)
    except (OSError, ValueError) as error:
        raise ConversionError(
            f"the ids of <image>/<video> are not given (image_token_id, video_token_id) and "
            f"{source.llm} holds no usable tokenizer: {error}"
        ) from None
    return tokenizer.image_id, tokenizer.video_id


def _check_agrees(settings: dict[str, Any], cfg: LongVILAConfig) -> None:
    """Top-level values that repeat a part's config must equal it (an edited copy is an error)."""
    derived = {
        "hidden_size": cfg.llm.hidden_size,
        "mm_hidden_size": cfg.vision.hidden_size,
        "image_size": cfg.vision.image_size,
    }
    for key, value in derived.items():
        if key in settings and settings[key] != value:
            raise ConversionError(
                f"top-level config: {key} = {settings[key]!r}, but the part's config says {value!r}"
            )


def read_longvila_config(source: HFSource) -> LongVILAConfig:
    """The architecture described by ``source`` (see the module docstring)."""
    from transformers import AutoConfig

    settings = source.settings
    llm_hf = AutoConfig.from_pretrained(str(source.llm), local_files_only=True)
    pad = {k: settings[k] for k in ("vocab_pad_multiple",) if k in settings}
    select = settings.get("mm_vision_select_layer", -2)
    image_id, video_id = _media_token_ids(source)
    vision = vision_config_from_hf(_siglip_vision_config(source.vision_tower), select)
    cfg = LongVILAConfig(
        vision=replace(vision, **_normalization(source.vision_tower)),
        projector=_projector_config(source),
        llm=llm_config_from_hf(llm_hf, **pad),
        image_token_id=image_id,
        video_token_id=video_id,
        max_seq_length=settings.get("max_seq_length"),
    )
    _check_agrees(settings, cfg)
    return cfg


def _normalization(folder: Path) -> dict[str, tuple[float, ...]]:
    """``image_mean`` / ``image_std`` of the tower's ``preprocessor_config.json``, where it has
    them (else the SigLIP defaults stand)."""
    path = folder / "preprocessor_config.json"
    if not path.is_file():
        return {}
    processor = json.loads(path.read_text(encoding="utf-8"))
    return {k: tuple(processor[k]) for k in ("image_mean", "image_std") if k in processor}


def _vision_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """SigLIP vision weights; of a whole ``SiglipModel`` only its ``vision_model.*``."""
    tensors = read_safetensors(folder)
    if any(name.startswith("text_model.") for name in tensors):
        tensors = {k: v for k, v in tensors.items() if k.startswith("vision_model.")}
    return tensors


def fresh_projector_tensors(cfg: LongVILAConfig, seed: int) -> dict[str, torch.Tensor]:
    """A newly initialized projector (torch's default init from ``seed``), in VILA's names.

    Drawn here, not by the model builder, so that every parallel layout starts from the same one.
    """
    from megatron_longvila.models.projector import MLPDownsampleProjector

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        projector = MLPDownsampleProjector(
            cfg.projector, cfg.vision.hidden_size, cfg.llm.hidden_size
        )
    return projector_state_to_hf(
        projector.state_dict(), cfg.vision.hidden_size, cfg.llm.hidden_size
    )


def read_longvila_weights(
    source: HFSource, cfg: LongVILAConfig, projector_seed: int = 1234
) -> dict[str, torch.Tensor]:
    """Every tensor of the model (module names, TP=1 layout) from ``source``, converted for
    ``cfg``; a fresh projector from ``projector_seed`` when the source has none."""
    parts = {
        "llm": read_safetensors(source.llm),
        "vision_tower": _vision_tensors(source.vision_tower),
        "mm_projector": (
            read_safetensors(source.mm_projector)
            if source.mm_projector is not None
            else fresh_projector_tensors(cfg, projector_seed)
        ),
    }
    return state_from_hf_parts(parts, cfg)
