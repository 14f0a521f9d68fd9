"""Checkpoint conversion between megatron dist checkpoints and Hugging Face folders.

* :func:`megatron_to_hf`: a dist checkpoint of any TP/PP/SP layout → a LongVILA folder
  (``llm/`` Qwen2/Llama, ``vision_tower/`` SigLIP, ``mm_projector/``, top-level ``config.json``).
* :func:`hf_to_megatron`: a LongVILA folder, or plain LLM + SigLIP (+ projector) folders
  (:class:`HFSource`) → a dist checkpoint written in a chosen TP/PP layout.
* :func:`load_hf_into_model`: the same weights straight into an already built model.

Tensor naming and fusions are ``models.hf_mapping``'s; the README's "Checkpoint conversion"
section documents the conventions. CLI: ``tools/convert_checkpoint.py``.
"""

from megatron_longvila.convert.hf_mapping import ConversionError
from megatron_longvila.convert.hf_source import HFSource, read_longvila_config
from megatron_longvila.convert.to_hf import megatron_to_hf
from megatron_longvila.convert.to_megatron import hf_to_megatron, load_hf_into_model

__all__ = [
    "ConversionError",
    "HFSource",
    "hf_to_megatron",
    "load_hf_into_model",
    "megatron_to_hf",
    "read_longvila_config",
]
