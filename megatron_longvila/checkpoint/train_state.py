"""``train_state.json``: what a checkpoint records beside its tensors.

Written last by rank 0 (its presence marks a complete checkpoint): the step, the world size, the
scheduler state and the training config, and the entries that describe the model without the
training config, read by inference and the converter:

* ``model_config``: the resolved :class:`LongVILAConfig` as a dict, with the tokenizer's media
  token ids; older saves carry only ``config.model`` (preset + overrides), which is built;
* ``tokenizer_path`` (else ``config.data.tokenizer_path``): the tokenizer folder or file;
* ``chat_template``: the prompt format it was trained with;
* ``num_video_frames`` and ``fps`` (else ``config.data.num_frames`` / ``fps``);
* ``hf_llm_config``: what the Hugging Face LLM the weights came from said beyond the
  architecture (token ids, ``initializer_range``, ...), for the export back.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from megatron_longvila.checkpoint.layout import TRAIN_STATE
from megatron_longvila.models.config import LongVILAConfig

MODEL_CONFIG_KEY = "model_config"
TOKENIZER_KEY = "tokenizer_path"
CHAT_TEMPLATE_KEY = "chat_template"
FRAMES_KEY = "num_video_frames"
HF_LLM_CONFIG_KEY = "hf_llm_config"


def model_record(
    cfg: LongVILAConfig,
    tokenizer_path: str | Path | None = None,
    chat_template: str | None = None,
    num_frames: int | None = None,
    fps: float | None = None,
    hf_llm_config: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The train-state entries that let inference rebuild the model and its prompt format from
    the checkpoint alone (``CheckpointManager.save(..., train_state=)``)."""
    record: dict[str, Any] = {
        MODEL_CONFIG_KEY: cfg.to_dict(),
        TOKENIZER_KEY: None if tokenizer_path is None else str(tokenizer_path),
        CHAT_TEMPLATE_KEY: chat_template,
        FRAMES_KEY: num_frames,
        "fps": fps,
        HF_LLM_CONFIG_KEY: hf_llm_config or None,
    }
    return {key: value for key, value in record.items() if value is not None}


def read_train_state(directory: Path) -> dict[str, Any]:
    """The checkpoint's ``train_state.json``, or {} for a bare dist checkpoint."""
    path = Path(directory) / TRAIN_STATE
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def architecture_from_train_state(state: dict[str, Any]) -> LongVILAConfig | None:
    """The model architecture recorded in a train state, or None."""
    if MODEL_CONFIG_KEY in state:
        return LongVILAConfig.from_dict(state[MODEL_CONFIG_KEY])
    model = (state.get("config") or {}).get("model")
    if model is None:
        return None
    return LongVILAConfig.from_preset(model.get("preset", "tiny"), model.get("overrides") or {})


def tokenizer_from_train_state(state: dict[str, Any]) -> str | None:
    return state.get(TOKENIZER_KEY) or ((state.get("config") or {}).get("data") or {}).get(
        "tokenizer_path"
    )


def chat_template_from_train_state(state: dict[str, Any]) -> str | None:
    return state.get(CHAT_TEMPLATE_KEY) or ((state.get("config") or {}).get("data") or {}).get(
        "chat_template"
    )


def frames_from_train_state(state: dict[str, Any]) -> tuple[int | None, float | None]:
    """(frames per video, sampling rate) the model was trained with, where recorded."""
    if FRAMES_KEY in state:
        return int(state[FRAMES_KEY]), state.get("fps")
    data = (state.get("config") or {}).get("data") or {}
    return data.get("num_frames"), data.get("fps")
