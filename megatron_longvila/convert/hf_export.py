"""Write a LongVILA Hugging Face folder.

::

    out/
      config.json        names the parts; frames, image size, select layer, RoPE, media token ids
      llm/               Qwen2ForCausalLM or LlamaForCausalLM: config.json, safetensors, tokenizer
      vision_tower/      SiglipVisionModel: config.json, preprocessor_config.json, safetensors
      mm_projector/      VILA's mlp_downsample projector: config.json, safetensors

``llm/`` and ``vision_tower/`` load with transformers' ``from_pretrained`` as they are. The LLM
is a Qwen2 model when it has q/k/v biases, else a Llama model (see ``hf_mapping``). The
top-level keys follow VILA's ``llava_llama`` config (``llm_cfg`` / ``vision_tower_cfg`` /
``mm_projector_cfg`` name the sub-folders, ``mm_vision_select_layer``, ``num_video_frames``)
plus ours: ``image_size``, ``rope_parameters``, ``max_position_embeddings``,
``image_token_id``, ``video_token_id``, ``vocab_pad_multiple``, ``max_seq_length``.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from megatron_longvila.convert.hf_mapping import (
    ConversionError,
    llm_config_to_hf,
    vision_config_to_hf,
)
from megatron_longvila.convert.hf_source import (
    LLM_DIR,
    PROJECTOR_DIR,
    PROJECTOR_TYPE,
    TOP_CONFIG,
    VISION_DIR,
)
from megatron_longvila.convert.safetensors_io import DEFAULT_MAX_SHARD_BYTES, write_safetensors
from megatron_longvila.data.tokenizer import has_vocabulary
from megatron_longvila.models.config import LongVILAConfig

#: Files of a Hugging Face tokenizer folder (whichever exist are copied next to the LLM).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)


def llm_architecture(cfg: LongVILAConfig) -> str:
    """``qwen2`` (q/k/v biases) or ``llama`` (none): the transformers family of the LLM."""
    return "qwen2" if cfg.llm.qkv_bias else "llama"


def _write_json(path: Path, values: dict[str, Any]) -> None:
    path.write_text(json.dumps(values, indent=2) + "\n", encoding="utf-8")


def _is_sentencepiece_file(tokenizer: Path) -> bool:
    return tokenizer.is_file() and tokenizer.suffix == ".model"


def check_tokenizer(tokenizer: Path) -> None:
    """Refuse a path that is neither a tokenizer folder nor a sentencepiece ``.model`` file."""
    if not (_is_sentencepiece_file(tokenizer) or has_vocabulary(tokenizer)):
        raise ConversionError(f"tokenizer {tokenizer} is not a tokenizer folder or .model file")


def copy_tokenizer(tokenizer: Path, folder: Path) -> list[str]:
    """Copy a tokenizer folder's files (or a sentencepiece ``.model`` file) into ``folder``."""
    check_tokenizer(tokenizer)
    if _is_sentencepiece_file(tokenizer):
        shutil.copyfile(tokenizer, folder / "tokenizer.model")
        return ["tokenizer.model"]
    found = [name for name in TOKENIZER_FILES if (tokenizer / name).is_file()]
    for name in found:
        shutil.copyfile(tokenizer / name, folder / name)
    return found


def _dtype_name(tensors: Mapping[str, torch.Tensor]) -> str:
    return str(next(iter(tensors.values())).dtype).removeprefix("torch.")


#: The token ids an LLM config names; a tokenizer that defines one fills it in where the source
#: LLM's config did not.
_TOKEN_ID_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")


def tokenizer_token_ids(tokenizer: Path | None, vocab_size: int) -> dict[str, int]:
    """bos / eos / pad ids a Hugging Face tokenizer folder defines (ids inside the model's
    ``vocab_size`` only: transformers sizes the embedding's padding row by ``pad_token_id``)."""
    if tokenizer is None or not has_vocabulary(tokenizer):
        return {}
    from transformers import AutoTokenizer

    loaded = AutoTokenizer.from_pretrained(str(tokenizer), local_files_only=True)
    ids = {key: getattr(loaded, key, None) for key in _TOKEN_ID_KEYS}
    return {k: v for k, v in ids.items() if isinstance(v, int) and 0 <= v < vocab_size}


def _llm_config(cfg: LongVILAConfig, dtype: str, extras: Mapping[str, Any]) -> Any:
    config = llm_config_to_hf(cfg.llm, llm_architecture(cfg), dict(extras))
    config.architectures = [
        "Qwen2ForCausalLM" if llm_architecture(cfg) == "qwen2" else "LlamaForCausalLM"
    ]
    config.dtype = dtype
    return config


def _vision_config(cfg: LongVILAConfig, dtype: str) -> Any:
    config = vision_config_to_hf(cfg.vision)
    config.architectures = ["SiglipVisionModel"]
    config.dtype = dtype
    return config


def _preprocessor_config(cfg: LongVILAConfig) -> dict[str, Any]:
    """transformers' SiglipImageProcessor settings for the tower's input size and scaling."""
    size = cfg.vision.image_size
    return {
        "image_processor_type": "SiglipImageProcessor",
        "do_resize": True,
        "size": {"height": size, "width": size},
        "resample": 3,  # bicubic
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(cfg.vision.image_mean),
        "image_std": list(cfg.vision.image_std),
        "do_convert_rgb": True,
    }


def _projector_config(cfg: LongVILAConfig, dtype: str) -> dict[str, Any]:
    return {
        "architectures": ["MultimodalProjector"],
        "model_type": "v2l_projector",
        "mm_projector_type": PROJECTOR_TYPE,
        "token_order": cfg.projector.token_order,
        "layer_norm_eps": cfg.projector.layer_norm_eps,
        "mm_hidden_size": cfg.vision.hidden_size,
        "hidden_size": cfg.llm.hidden_size,
        "dtype": dtype,
    }


def top_level_config(
    cfg: LongVILAConfig, llm_config: Any, num_frames: int, fps: float | None
) -> dict[str, Any]:
    """The folder's ``config.json`` (see the module docstring)."""

    def part(name: str, architecture: str, model_type: str) -> dict[str, Any]:
        return {"_name_or_path": name, "architectures": [architecture], "model_type": model_type}

    return {
        "architectures": ["LlavaLlamaModel"],
        "model_type": "llava_llama",
        "llm_cfg": part(LLM_DIR, llm_config.architectures[0], llm_config.model_type),
        "vision_tower_cfg": part(VISION_DIR, "SiglipVisionModel", "siglip_vision_model"),
        "mm_projector_cfg": part(PROJECTOR_DIR, "MultimodalProjector", "v2l_projector"),
        "hidden_size": cfg.llm.hidden_size,
        "mm_hidden_size": cfg.vision.hidden_size,
        "mm_vision_select_layer": cfg.vision.select_layer,
        "image_size": cfg.vision.image_size,
        "num_video_frames": num_frames,
        "fps": fps or 0.0,
        "rope_parameters": dict(llm_config.rope_parameters),
        "max_position_embeddings": cfg.llm.max_position_embeddings,
        "image_token_id": cfg.image_token_id,
        "video_token_id": cfg.video_token_id,
        "vocab_pad_multiple": cfg.llm.vocab_pad_multiple,
        "max_seq_length": cfg.max_seq_length,
    }


def write_longvila_folder(
    output: Path,
    cfg: LongVILAConfig,
    hf_parts: Mapping[str, Mapping[str, torch.Tensor]],
    *,
    tokenizer: Path | None,
    llm_extras: Mapping[str, Any] | None = None,
    num_frames: int,
    fps: float | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    progress: bool = False,
) -> None:
    """Write the folder into ``output`` (an empty folder); ``hf_parts`` holds each part's tensors
    in transformers/VILA names; ``tokenizer`` None writes the LLM without tokenizer files.
    ``llm_extras`` (what the source LLM's config said beyond the architecture) are kept in
    ``llm/config.json``, and bos / eos / pad ids the tokenizer defines fill in what they lack."""
    folders = {part: output / part for part in (LLM_DIR, VISION_DIR, PROJECTOR_DIR)}
    for folder in folders.values():
        folder.mkdir()
    extras = {**tokenizer_token_ids(tokenizer, cfg.llm.vocab_size), **(llm_extras or {})}
    llm_config = _llm_config(cfg, _dtype_name(hf_parts[LLM_DIR]), extras)
    llm_config.save_pretrained(str(folders[LLM_DIR]))
    if tokenizer is not None:
        copy_tokenizer(tokenizer, folders[LLM_DIR])
    _vision_config(cfg, _dtype_name(hf_parts[VISION_DIR])).save_pretrained(str(folders[VISION_DIR]))
    _write_json(folders[VISION_DIR] / "preprocessor_config.json", _preprocessor_config(cfg))
    _write_json(
        folders[PROJECTOR_DIR] / TOP_CONFIG,
        _projector_config(cfg, _dtype_name(hf_parts[PROJECTOR_DIR])),
    )
    llm_tensors = dict(hf_parts[LLM_DIR])
    if cfg.llm.tie_word_embeddings:  # as transformers saves it: tied again on load
        del llm_tensors["lm_head.weight"]
    tensors = {LLM_DIR: llm_tensors, VISION_DIR: hf_parts[VISION_DIR]}
    tensors[PROJECTOR_DIR] = hf_parts[PROJECTOR_DIR]
    for part, folder in folders.items():
        write_safetensors(folder, tensors[part], max_shard_bytes, progress)
    _write_json(output / TOP_CONFIG, top_level_config(cfg, llm_config, num_frames, fps))
