"""Exact conversion between our modules and transformers' models, both ways.

State dicts here are full tensors (tensor-parallel size 1), named as ``module.state_dict()``
names them on each side; splitting them for other layouts is megatron's ``sharded_state_dict``
job. Nothing is rounded or re-initialised: HF → ours → HF gives back the same bits.

LLM (``Qwen2ForCausalLM``, ``LlamaForCausalLM`` ↔
:class:`~megatron_longvila.models.llm.LanguageModel`):

* q, k, v projections (weights and Qwen2's biases) fuse into ``linear_qkv`` in megatron's
  per-query-group layout: for each of the ``num_kv_heads`` groups, that group's
  ``num_heads / num_kv_heads`` query heads, then its key head, then its value head. Tensor
  parallelism splits this tensor by whole groups.
* gate and up projections fuse into ``linear_fc1`` as ``[gate; up]`` (megatron's SwiGLU applies
  the activation to the first half).
* RoPE needs no permutation: transformers' Llama/Qwen2 and megatron both rotate the two halves
  of each head (``rotate_half``), so q/k rows keep their order.
* The embedding and output layer get zero rows appended up to ``padded_vocab_size``; going back
  they are cut off. With tied embeddings ours has no ``output_layer.weight``; HF's
  ``lm_head.weight`` must equal the embedding and is written back as a copy of it.

Vision (``SiglipVisionModel`` ↔ :class:`~megatron_longvila.models.vision.VisionTower`): q, k,
v fuse per head (each head is its own query group); ``post_layernorm`` is
``encoder.final_layernorm``; the pooling head keeps its names. Keys are read with or without
the ``vision_model.`` prefix of transformers 4 checkpoints and written without it, as
transformers 5 names them (it loads either).

Projector (VILA's ``mm_projector``: ``layers.1`` LayerNorm, ``layers.2``/``layers.4`` Linear ↔
:class:`~megatron_longvila.models.projector.MLPDownsampleProjector` ``norm``/``fc1``/``fc2``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import torch

from megatron_longvila.models.config import LLMConfig, RopeScaling, VisionConfig

Tensors = Mapping[str, torch.Tensor]


class ConversionError(ValueError):
    """A tensor is missing, unexpected, or has the wrong shape."""


class _Source:
    """Tensors taken one by one by name and shape-checked; what is left over is an error."""

    def __init__(self, tensors: Tensors, what: str, strip_prefix: str = "") -> None:
        self.what = what
        self.left = {
            (k[len(strip_prefix) :] if strip_prefix and k.startswith(strip_prefix) else k): v
            for k, v in tensors.items()
            if not k.endswith("_extra_state")  # megatron's (empty) FP8 metadata
        }

    def take(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        if name not in self.left:
            raise ConversionError(f"{self.what}: missing tensor {name!r} (expected shape {shape})")
        tensor = self.left.pop(name)
        if tuple(tensor.shape) != tuple(shape):
            raise ConversionError(
                f"{self.what}: tensor {name!r} has shape {tuple(tensor.shape)}, expected {shape}"
            )
        return tensor

    def finish(self) -> None:
        if self.left:
            names = sorted(self.left)
            shown = ", ".join(f"{n} {tuple(self.left[n].shape)}" for n in names[:8])
            more = f" and {len(names) - 8} more" if len(names) > 8 else ""
            raise ConversionError(f"{self.what}: unexpected tensor(s) {shown}{more}")


# --------------------------------------------------------------------------------------------
# Fusions (shared by LLM and vision)
# --------------------------------------------------------------------------------------------


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """q [heads·d, ...], k and v [kv_heads·d, ...] → megatron's grouped ``[q_g, k_g, v_g]_g``."""
    rest = q.shape[1:]
    groups = [t.reshape(num_kv_heads, t.shape[0] // num_kv_heads, *rest) for t in (q, k, v)]
    return torch.cat(groups, dim=1).reshape(-1, *rest)


def split_qkv(
    qkv: torch.Tensor, num_heads: int, num_kv_heads: int, head_dim: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of :func:`fuse_qkv`."""
    rest = qkv.shape[1:]
    q_per_group = num_heads // num_kv_heads * head_dim
    grouped = qkv.reshape(num_kv_heads, q_per_group + 2 * head_dim, *rest)
    q, k, v = grouped.split([q_per_group, head_dim, head_dim], dim=1)
    return tuple(t.reshape(-1, *rest) for t in (q, k, v))  # type: ignore[return-value]


def _pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    return torch.cat([t, t.new_zeros(rows - t.shape[0], *t.shape[1:])])


# --------------------------------------------------------------------------------------------
# LLM
# --------------------------------------------------------------------------------------------


def llm_state_from_hf(hf: Tensors, cfg: LLMConfig) -> dict[str, torch.Tensor]:
    """State dict of a transformers Qwen2/Llama ``...ForCausalLM`` → ours (TP=1)."""
    src = _Source(hf, "HF LLM state")
    h, d, f = cfg.hidden_size, cfg.kv_channels, cfg.ffn_hidden_size
    nq, nkv = cfg.num_heads * d, cfg.num_kv_heads * d
    embedding = src.take("model.embed_tokens.weight", (cfg.vocab_size, h))
    out = {"embedding.word_embeddings.weight": _pad_rows(embedding, cfg.padded_vocab_size)}
    for i in range(cfg.num_layers):
        hp, op = f"model.layers.{i}.", f"decoder.layers.{i}."
        attn = hp + "self_attn."
        q = src.take(attn + "q_proj.weight", (nq, h))
        k = src.take(attn + "k_proj.weight", (nkv, h))
        v = src.take(attn + "v_proj.weight", (nkv, h))
        out[op + "self_attention.linear_qkv.weight"] = fuse_qkv(q, k, v, cfg.num_kv_heads)
        if cfg.qkv_bias:
            qb = src.take(attn + "q_proj.bias", (nq,))
            kb = src.take(attn + "k_proj.bias", (nkv,))
            vb = src.take(attn + "v_proj.bias", (nkv,))
            out[op + "self_attention.linear_qkv.bias"] = fuse_qkv(qb, kb, vb, cfg.num_kv_heads)
        out[op + "self_attention.linear_proj.weight"] = src.take(attn + "o_proj.weight", (h, nq))
        gate = src.take(hp + "mlp.gate_proj.weight", (f, h))
        up = src.take(hp + "mlp.up_proj.weight", (f, h))
        out[op + "mlp.linear_fc1.weight"] = torch.cat([gate, up])
        out[op + "mlp.linear_fc2.weight"] = src.take(hp + "mlp.down_proj.weight", (h, f))
        out[op + "input_layernorm.weight"] = src.take(hp + "input_layernorm.weight", (h,))
        out[op + "pre_mlp_layernorm.weight"] = src.take(
            hp + "post_attention_layernorm.weight", (h,)
        )
    out["decoder.final_layernorm.weight"] = src.take("model.norm.weight", (h,))
    if cfg.tie_word_embeddings:
        if "lm_head.weight" in src.left:
            head = src.take("lm_head.weight", (cfg.vocab_size, h))
            if not torch.equal(head, embedding):
                raise ConversionError(
                    "HF LLM state: tie_word_embeddings is set but lm_head.weight differs from "
                    "model.embed_tokens.weight"
                )
    else:
        head = src.take("lm_head.weight", (cfg.vocab_size, h))
        out["output_layer.weight"] = _pad_rows(head, cfg.padded_vocab_size)
    src.finish()
    return out


def llm_state_to_hf(ours: Tensors, cfg: LLMConfig) -> dict[str, torch.Tensor]:
    """Our LLM state dict (TP=1) → transformers ``...ForCausalLM`` names (padding rows cut)."""
    src = _Source(ours, "LLM state")
    h, d, f = cfg.hidden_size, cfg.kv_channels, cfg.ffn_hidden_size
    nq, nkv = cfg.num_heads * d, cfg.num_kv_heads * d
    vp, v = cfg.padded_vocab_size, cfg.vocab_size
    embedding = src.take("embedding.word_embeddings.weight", (vp, h))[:v]
    out = {"model.embed_tokens.weight": embedding}
    for i in range(cfg.num_layers):
        hp, op = f"model.layers.{i}.", f"decoder.layers.{i}."
        attn = hp + "self_attn."
        qkv = src.take(op + "self_attention.linear_qkv.weight", (nq + 2 * nkv, h))
        q, k, vv = split_qkv(qkv, cfg.num_heads, cfg.num_kv_heads, d)
        out |= {attn + "q_proj.weight": q, attn + "k_proj.weight": k, attn + "v_proj.weight": vv}
        if cfg.qkv_bias:
            bias = src.take(op + "self_attention.linear_qkv.bias", (nq + 2 * nkv,))
            qb, kb, vb = split_qkv(bias, cfg.num_heads, cfg.num_kv_heads, d)
            out |= {attn + "q_proj.bias": qb, attn + "k_proj.bias": kb, attn + "v_proj.bias": vb}
        out[attn + "o_proj.weight"] = src.take(op + "self_attention.linear_proj.weight", (h, nq))
        gate, up = src.take(op + "mlp.linear_fc1.weight", (2 * f, h)).chunk(2)
        out[hp + "mlp.gate_proj.weight"] = gate
        out[hp + "mlp.up_proj.weight"] = up
        out[hp + "mlp.down_proj.weight"] = src.take(op + "mlp.linear_fc2.weight", (h, f))
        out[hp + "input_layernorm.weight"] = src.take(op + "input_layernorm.weight", (h,))
        out[hp + "post_attention_layernorm.weight"] = src.take(
            op + "pre_mlp_layernorm.weight", (h,)
        )
    out["model.norm.weight"] = src.take("decoder.final_layernorm.weight", (h,))
    if cfg.tie_word_embeddings:
        out["lm_head.weight"] = embedding.clone()
    else:
        out["lm_head.weight"] = src.take("output_layer.weight", (vp, h))[:v]
    src.finish()
    return out


def llm_config_from_hf(hf_config: Any, vocab_pad_multiple: int = 128) -> LLMConfig:
    """Our LLMConfig from a transformers ``Qwen2Config`` or ``LlamaConfig``."""
    kind = hf_config.model_type
    if kind not in ("qwen2", "llama"):
        raise ConversionError(f"LLM config: model_type {kind!r} is not 'qwen2' or 'llama'")
    if hf_config.hidden_act != "silu":
        raise ConversionError(f"LLM config: hidden_act {hf_config.hidden_act!r} is not 'silu'")
    if kind == "qwen2" and getattr(hf_config, "use_sliding_window", False):
        raise ConversionError("LLM config: Qwen2 sliding-window attention is not supported")
    if kind == "llama" and (hf_config.attention_bias or getattr(hf_config, "mlp_bias", False)):
        raise ConversionError(
            "LLM config: Llama attention_bias/mlp_bias add biases to o_proj/MLP, which this "
            "model does not have"
        )
    heads = hf_config.num_attention_heads
    head_dim = getattr(hf_config, "head_dim", None)
    return LLMConfig(
        vocab_size=hf_config.vocab_size,
        hidden_size=hf_config.hidden_size,
        num_layers=hf_config.num_hidden_layers,
        num_heads=heads,
        num_kv_heads=hf_config.num_key_value_heads or heads,
        ffn_hidden_size=hf_config.intermediate_size,
        head_dim=None if head_dim in (None, hf_config.hidden_size // heads) else head_dim,
        rms_norm_eps=hf_config.rms_norm_eps,
        rope_theta=_rope_parameters(hf_config)["rope_theta"],
        rope_scaling=_rope_scaling_from_hf(_rope_parameters(hf_config)),
        qkv_bias=kind == "qwen2",
        tie_word_embeddings=bool(hf_config.tie_word_embeddings),
        max_position_embeddings=hf_config.max_position_embeddings,
        vocab_pad_multiple=vocab_pad_multiple,
    )


def _rope_parameters(hf_config: Any) -> dict[str, Any]:
    """transformers 5 keeps RoPE settings in ``rope_parameters``; 4.x in rope_theta/rope_scaling."""
    params = getattr(hf_config, "rope_parameters", None)
    if params:
        return dict(params)
    return {**(getattr(hf_config, "rope_scaling", None) or {}), "rope_theta": hf_config.rope_theta}


def _rope_scaling_from_hf(params: dict[str, Any]) -> RopeScaling | None:
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "default":
        return None
    if kind == "linear":
        return RopeScaling(kind="linear", factor=float(params["factor"]))
    if kind == "llama3":
        return RopeScaling(
            kind="llama3",
            factor=float(params["factor"]),
            low_freq_factor=float(params["low_freq_factor"]),
            high_freq_factor=float(params["high_freq_factor"]),
            original_max_position_embeddings=int(params["original_max_position_embeddings"]),
        )
    raise ConversionError(f"LLM config: RoPE type {kind!r} is not supported (linear, llama3)")


#: Keys of a transformers LLM config that :func:`llm_config_to_hf` derives from our LLMConfig
#: (or that describe the file, not the model); every other key is kept as the source had it.
_DERIVED_LLM_KEYS = frozenset(
    {
        "vocab_size",
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "intermediate_size",
        "head_dim",
        "rms_norm_eps",
        "rope_parameters",
        "rope_theta",
        "rope_scaling",
        "tie_word_embeddings",
        "max_position_embeddings",
        "hidden_act",
        "attention_bias",
        "mlp_bias",
        "use_sliding_window",
        "layer_types",
        "model_type",
        "architectures",
        "dtype",
        "torch_dtype",
        "transformers_version",
        "_name_or_path",
    }
)


def llm_config_extras(hf_config: dict[str, Any]) -> dict[str, Any]:
    """What a transformers LLM config (as a dict) says beyond the architecture: token ids,
    ``initializer_range``, dropout, cache settings and the like (``None`` values left out)."""
    return {k: v for k, v in hf_config.items() if k not in _DERIVED_LLM_KEYS and v is not None}


def llm_config_to_hf(
    cfg: LLMConfig, architecture: Literal["qwen2", "llama"], extras: dict[str, Any] | None = None
) -> Any:
    """A transformers ``Qwen2Config``/``LlamaConfig`` describing ``cfg``, carrying ``extras``
    (:func:`llm_config_extras` of the source) besides."""
    from transformers import LlamaConfig, Qwen2Config

    if architecture == "qwen2" and not cfg.qkv_bias:
        raise ConversionError("LLM config: Qwen2 always has q/k/v biases; qkv_bias is False")
    if architecture == "llama" and cfg.qkv_bias:
        raise ConversionError("LLM config: Llama has no q/k/v-only biases; qkv_bias is True")
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling is not None:
        s = cfg.rope_scaling
        rope = {"rope_type": s.kind, "factor": s.factor, "rope_theta": cfg.rope_theta}
        if s.kind == "llama3":
            rope |= {
                "low_freq_factor": s.low_freq_factor,
                "high_freq_factor": s.high_freq_factor,
                "original_max_position_embeddings": s.original_max_position_embeddings,
            }
    cls = Qwen2Config if architecture == "qwen2" else LlamaConfig
    return cls(
        **llm_config_extras(extras or {}),
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        intermediate_size=cfg.ffn_hidden_size,
        head_dim=cfg.kv_channels,
        rms_norm_eps=cfg.rms_norm_eps,
        rope_parameters=rope,
        tie_word_embeddings=cfg.tie_word_embeddings,
        max_position_embeddings=cfg.max_position_embeddings,
        hidden_act="silu",
    )


# --------------------------------------------------------------------------------------------
# Vision
# --------------------------------------------------------------------------------------------

_SIGLIP_PREFIX = "vision_model."
_HEAD_SHAPES = {
    "probe": lambda h, f: (1, 1, h),
    "attention.in_proj_weight": lambda h, f: (3 * h, h),
    "attention.in_proj_bias": lambda h, f: (3 * h,),
    "attention.out_proj.weight": lambda h, f: (h, h),
    "attention.out_proj.bias": lambda h, f: (h,),
    "layernorm.weight": lambda h, f: (h,),
    "layernorm.bias": lambda h, f: (h,),
    "mlp.fc1.weight": lambda h, f: (f, h),
    "mlp.fc1.bias": lambda h, f: (f,),
    "mlp.fc2.weight": lambda h, f: (h, f),
    "mlp.fc2.bias": lambda h, f: (h,),
}
# (HF name within a layer, our name within a layer, shape from (hidden, ffn))
_VISION_LAYER_ONE_TO_ONE = (
    ("layer_norm1.weight", "input_layernorm.weight", lambda h, f: (h,)),
    ("layer_norm1.bias", "input_layernorm.bias", lambda h, f: (h,)),
    ("self_attn.out_proj.weight", "self_attention.linear_proj.weight", lambda h, f: (h, h)),
    ("self_attn.out_proj.bias", "self_attention.linear_proj.bias", lambda h, f: (h,)),
    ("layer_norm2.weight", "pre_mlp_layernorm.weight", lambda h, f: (h,)),
    ("layer_norm2.bias", "pre_mlp_layernorm.bias", lambda h, f: (h,)),
    ("mlp.fc1.weight", "mlp.linear_fc1.weight", lambda h, f: (f, h)),
    ("mlp.fc1.bias", "mlp.linear_fc1.bias", lambda h, f: (f,)),
    ("mlp.fc2.weight", "mlp.linear_fc2.weight", lambda h, f: (h, f)),
    ("mlp.fc2.bias", "mlp.linear_fc2.bias", lambda h, f: (h,)),
)


def _vision_layer(cfg: VisionConfig, i: int) -> str:
    """Our prefix of SigLIP layer ``i``: the layers that run, then the unused ones."""
    run = cfg.num_layers_to_run
    return f"encoder.layers.{i}" if i < run else f"unused_layers.layers.{i - run}"


def _vision_one_to_one(cfg: VisionConfig) -> list[tuple[str, str, tuple[int, ...]]]:
    """(HF name, our name, shape) of every vision tensor that maps unchanged."""
    h, f, p = cfg.hidden_size, cfg.ffn_hidden_size, cfg.patch_size
    patch_shape = (h, cfg.num_channels, p, p)
    pairs = [
        ("embeddings.patch_embedding.weight", "patch_embedding.weight", patch_shape),
        ("embeddings.patch_embedding.bias", "patch_embedding.bias", (h,)),
        ("embeddings.position_embedding.weight", "position_embedding.weight", (cfg.num_patches, h)),
        ("post_layernorm.weight", "encoder.final_layernorm.weight", (h,)),
        ("post_layernorm.bias", "encoder.final_layernorm.bias", (h,)),
    ]
    for i in range(cfg.num_layers):
        for hf_name, our_name, shape in _VISION_LAYER_ONE_TO_ONE:
            ours = f"{_vision_layer(cfg, i)}.{our_name}"
            pairs.append((f"encoder.layers.{i}.{hf_name}", ours, shape(h, f)))
    if cfg.pooling_head:
        pairs += [(f"head.{n}", f"head.{n}", shape(h, f)) for n, shape in _HEAD_SHAPES.items()]
    return pairs


def _has_prefix(tensors: Tensors) -> bool:
    return any(k.startswith(_SIGLIP_PREFIX) for k in tensors)


def vision_state_from_hf(hf: Tensors, cfg: VisionConfig) -> dict[str, torch.Tensor]:
    """State dict of a transformers ``SiglipVisionModel`` → our :class:`VisionTower` (TP=1)."""
    src = _Source(hf, "HF SigLIP state", strip_prefix=_SIGLIP_PREFIX if _has_prefix(hf) else "")
    h = cfg.hidden_size
    out = {ours: src.take(theirs, shape) for theirs, ours, shape in _vision_one_to_one(cfg)}
    for i in range(cfg.num_layers):
        attn = f"encoder.layers.{i}.self_attn."
        for kind, shape in (("weight", (h, h)), ("bias", (h,))):
            q, k, v = (src.take(f"{attn}{part}_proj.{kind}", shape) for part in "qkv")
            out[f"{_vision_layer(cfg, i)}.self_attention.linear_qkv.{kind}"] = fuse_qkv(
                q, k, v, cfg.num_heads
            )
    src.finish()
    return out


def vision_state_to_hf(ours: Tensors, cfg: VisionConfig) -> dict[str, torch.Tensor]:
    """Our vision tower state dict (TP=1) → transformers ``SiglipVisionModel`` names."""
    src = _Source(ours, "vision tower state")
    h, d = cfg.hidden_size, cfg.hidden_size // cfg.num_heads
    out = {theirs: src.take(ours_, shape) for theirs, ours_, shape in _vision_one_to_one(cfg)}
    for i in range(cfg.num_layers):
        for kind, shape in (("weight", (3 * h, h)), ("bias", (3 * h,))):
            fused = src.take(f"{_vision_layer(cfg, i)}.self_attention.linear_qkv.{kind}", shape)
            q, k, v = split_qkv(fused, cfg.num_heads, cfg.num_heads, d)
            for part, t in zip("qkv", (q, k, v)):
                out[f"encoder.layers.{i}.self_attn.{part}_proj.{kind}"] = t
    src.finish()
    return out


def vision_config_from_hf(hf_config: Any, select_layer: int = -2) -> VisionConfig:
    """Our VisionConfig from a transformers ``SiglipVisionConfig`` (plus LongVILA's layer)."""
    if hf_config.hidden_act != "gelu_pytorch_tanh":
        raise ConversionError(
            f"SigLIP config: hidden_act {hf_config.hidden_act!r} is not 'gelu_pytorch_tanh'"
        )
    return VisionConfig(
        image_size=hf_config.image_size,
        patch_size=hf_config.patch_size,
        hidden_size=hf_config.hidden_size,
        num_layers=hf_config.num_hidden_layers,
        num_heads=hf_config.num_attention_heads,
        ffn_hidden_size=hf_config.intermediate_size,
        layer_norm_eps=hf_config.layer_norm_eps,
        select_layer=select_layer,
        pooling_head=bool(getattr(hf_config, "vision_use_head", True)),
        num_channels=hf_config.num_channels,
    )


def vision_config_to_hf(cfg: VisionConfig) -> Any:
    """A transformers ``SiglipVisionConfig`` describing ``cfg`` (``select_layer`` is ours)."""
    from transformers import SiglipVisionConfig

    return SiglipVisionConfig(
        image_size=cfg.image_size,
        patch_size=cfg.patch_size,
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        intermediate_size=cfg.ffn_hidden_size,
        layer_norm_eps=cfg.layer_norm_eps,
        num_channels=cfg.num_channels,
        vision_use_head=cfg.pooling_head,
        hidden_act="gelu_pytorch_tanh",
    )


# --------------------------------------------------------------------------------------------
# Projector
# --------------------------------------------------------------------------------------------

# VILA's nn.Sequential(DownSampleBlock, LayerNorm, Linear, GELU, Linear) indices → our names.
_PROJECTOR_NAMES = (("layers.1", "norm"), ("layers.2", "fc1"), ("layers.4", "fc2"))


def _projector_shapes(vision_hidden: int, llm_hidden: int) -> dict[str, tuple[int, ...]]:
    merged = 4 * vision_hidden
    return {
        "norm.weight": (merged,),
        "norm.bias": (merged,),
        "fc1.weight": (llm_hidden, merged),
        "fc1.bias": (llm_hidden,),
        "fc2.weight": (llm_hidden, llm_hidden),
        "fc2.bias": (llm_hidden,),
    }


def projector_state_from_hf(
    hf: Tensors, vision_hidden: int, llm_hidden: int
) -> dict[str, torch.Tensor]:
    """VILA ``mm_projector`` state dict (``layers.N.*``) → our projector."""
    src = _Source(hf, "HF mm_projector state")
    shapes = _projector_shapes(vision_hidden, llm_hidden)
    out = {}
    for theirs, ours in _PROJECTOR_NAMES:
        for kind in ("weight", "bias"):
            out[f"{ours}.{kind}"] = src.take(f"{theirs}.{kind}", shapes[f"{ours}.{kind}"])
    src.finish()
    return out


def projector_state_to_hf(
    ours: Tensors, vision_hidden: int, llm_hidden: int
) -> dict[str, torch.Tensor]:
    """Our projector state dict → VILA ``mm_projector`` names."""
    src = _Source(ours, "projector state")
    shapes = _projector_shapes(vision_hidden, llm_hidden)
    out = {}
    for theirs, ours_ in _PROJECTOR_NAMES:
        for kind in ("weight", "bias"):
            out[f"{theirs}.{kind}"] = src.take(f"{ours_}.{kind}", shapes[f"{ours_}.{kind}"])
    src.finish()
    return out


# --------------------------------------------------------------------------------------------
# Loading into a module
# --------------------------------------------------------------------------------------------


def load_full_state(module: torch.nn.Module, state: Tensors) -> None:
    """Load a full (TP=1) state dict into ``module``, naming every missing/unexpected tensor.

    Only for a module built with tensor-parallel size 1; other layouts load through megatron's
    ``sharded_state_dict`` / ``dist_checkpointing``.
    """
    own = {k: v for k, v in module.state_dict().items() if not k.endswith("_extra_state")}
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise ConversionError(
            f"{type(module).__name__}: missing tensor(s) {missing}, unexpected tensor(s) "
            f"{unexpected}"
        )
    for name, tensor in state.items():
        if tuple(tensor.shape) != tuple(own[name].shape):
            raise ConversionError(
                f"{type(module).__name__}: tensor {name!r} has shape {tuple(tensor.shape)}, "
                f"the module's is {tuple(own[name].shape)}"
            )
    module.load_state_dict(dict(state), strict=False)
