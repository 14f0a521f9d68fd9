"""transformers reference models with random weights, for tests that compare against them.

Weights are drawn so that outputs are O(1) and norms/biases are not at their trivial values,
otherwise a swapped norm or a dropped bias could hide inside the tolerance.
"""

from __future__ import annotations

import torch

from megatron_longvila.convert.hf_mapping import llm_config_to_hf, vision_config_to_hf
from megatron_longvila.models.config import LLMConfig, VisionConfig


def hf_causal_lm(architecture: str, cfg: LLMConfig, seed: int = 0):
    """A ``Qwen2ForCausalLM`` or ``LlamaForCausalLM`` for ``cfg`` (eager attention, eval)."""
    from transformers import LlamaForCausalLM, Qwen2ForCausalLM

    hf_config = llm_config_to_hf(cfg, architecture)
    hf_config._attn_implementation = "eager"
    hf_config.initializer_range = 0.2  # logits O(1), attention far from uniform
    torch.manual_seed(seed)
    cls = Qwen2ForCausalLM if architecture == "qwen2" else LlamaForCausalLM
    model = cls(hf_config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(1.0, 0.1)
    return model


def hf_siglip(cfg: VisionConfig, seed: int = 0):
    """A ``SiglipVisionModel`` for ``cfg`` (eager attention, eval)."""
    from transformers import SiglipVisionModel

    hf_config = vision_config_to_hf(cfg)
    hf_config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = SiglipVisionModel(hf_config).eval()
    with torch.no_grad():  # transformers' init leaves norms at 1/0 and biases at 0
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.normal_(1.0, 0.2)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.2)
    return model
