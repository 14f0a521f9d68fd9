"""Architecture of the LongVILA model: vision tower, projector, LLM, and the whole.

Every knob is a typed field of a dataclass validated on construction; an error names the class,
the field and the bad value. Run settings (dtype, parallel sizes) are not part of these configs:
the builders take them, so one architecture serves any layout.

Presets (``VisionConfig.preset("siglip-so400m-patch14-384")`` etc., names in ``*_PRESETS``) go
from ``tiny`` (CPU tests and demo) to the sizes of released checkpoints.
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Literal, TypeVar

T = TypeVar("T")


#: The three modules of a LongVILA model, as its state dict, checkpoints and Hugging Face folders
#: name them.
MODULES = ("vision_tower", "mm_projector", "llm")


class ConfigError(ValueError):
    """A config field has a value the model cannot be built with."""


def _check(ok: bool, cls: object, name: str, message: str) -> None:
    if not ok:
        value = getattr(cls, name)
        raise ConfigError(f"{type(cls).__name__}.{name} = {value!r}: {message}")


def _positive(cfg: object, *names: str) -> None:
    for name in names:
        value = getattr(cfg, name)
        _check(isinstance(value, int) and value > 0, cfg, name, "must be a positive integer")


def _from_dict(cls: type[T], values: dict[str, Any]) -> T:
    """Build ``cls`` from a plain dict (a YAML section), refusing keys it does not know."""
    known = {f.name for f in fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"{cls.__name__}: unknown field(s) {unknown}; known: {sorted(known)}")
    return cls(**values)


def _preset(cls: type[T], presets: dict[str, T], name: str, overrides: dict[str, Any]) -> T:
    if name not in presets:
        raise ConfigError(f"{cls.__name__}: no preset {name!r}; presets: {sorted(presets)}")
    # A deep copy: presets hold nested configs that callers may change.
    return replace(copy.deepcopy(presets[name]), **overrides)  # type: ignore[type-var]


# --------------------------------------------------------------------------------------------
# Vision tower
# --------------------------------------------------------------------------------------------


@dataclass
class VisionConfig:
    """A SigLIP-style ViT: conv patch embedding (no class token), learned position embeddings,
    pre-LayerNorm transformer layers with biases and a GELU(tanh) MLP.

    ``select_layer`` picks the features handed to the projector the way transformers'
    ``SiglipVisionModel(...).hidden_states[select_layer]`` does: index 0 is the patch embeddings,
    index i the output of layer i, negative indices count from the end (-1 = the last layer,
    before SigLIP's post-layernorm, which is not applied). Layers after the selected one, the
    post-layernorm and the optional attention-pooling head are kept as frozen weights that never
    run, so a converted checkpoint carries the whole SigLIP model and converts back unchanged.
    """

    image_size: int = 384
    patch_size: int = 14
    hidden_size: int = 1152
    num_layers: int = 27
    num_heads: int = 16
    ffn_hidden_size: int = 4304
    layer_norm_eps: float = 1e-6
    select_layer: int = -2
    pooling_head: bool = False  # SigLIP's attention-pooling head (never run by LongVILA)
    num_channels: int = 3
    #: Per-channel normalization of the tower's input, ``(pixel / 255 - mean) / std`` (SigLIP:
    #: 0.5 and 0.5).
    image_mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    image_std: tuple[float, ...] = (0.5, 0.5, 0.5)

    def __post_init__(self) -> None:
        # Tuples whether built in code or read back from JSON/YAML lists.
        self.image_mean = tuple(float(v) for v in self.image_mean)
        self.image_std = tuple(float(v) for v in self.image_std)
        for name in ("image_mean", "image_std"):
            _check(
                len(getattr(self, name)) == self.num_channels,
                self,
                name,
                f"must have one value per channel ({self.num_channels})",
            )
        _check(all(v > 0 for v in self.image_std), self, "image_std", "must be > 0")
        _positive(
            self,
            "image_size",
            "patch_size",
            "hidden_size",
            "num_layers",
            "num_heads",
            "ffn_hidden_size",
            "num_channels",
        )
        _check(
            self.image_size >= self.patch_size,
            self,
            "image_size",
            f"must be at least patch_size {self.patch_size}",
        )
        _check(
            self.hidden_size % self.num_heads == 0,
            self,
            "hidden_size",
            f"must be divisible by num_heads {self.num_heads}",
        )
        _check(
            1 <= self.num_layers_to_run <= self.num_layers,
            self,
            "select_layer",
            f"must pick one of the {self.num_layers} layer outputs "
            f"(1..{self.num_layers} or -1..-{self.num_layers})",
        )
        _check(self.layer_norm_eps > 0, self, "layer_norm_eps", "must be > 0")

    @property
    def grid_size(self) -> int:
        """Patches per image side; pixels beyond the last whole patch are not seen (as in
        SigLIP so400m: 384 px / 14 → 27 patches)."""
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size**2

    @property
    def num_layers_to_run(self) -> int:
        """How many layers produce the selected features."""
        if self.select_layer >= 0:
            return self.select_layer
        return self.num_layers + 1 + self.select_layer

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> VisionConfig:
        return _preset(cls, VISION_PRESETS, name, overrides)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> VisionConfig:
        return _from_dict(cls, values)


VISION_PRESETS: dict[str, VisionConfig] = {
    # 3×3 patches: an odd grid, so the projector's padding runs even in the demo.
    "tiny": VisionConfig(
        image_size=42, patch_size=14, hidden_size=32, num_layers=3, num_heads=4, ffn_hidden_size=64
    ),
    "siglip-base-patch16-224": VisionConfig(
        image_size=224,
        patch_size=16,
        hidden_size=768,
        num_layers=12,
        num_heads=12,
        ffn_hidden_size=3072,
        pooling_head=True,
    ),
    "siglip-large-patch16-384": VisionConfig(
        image_size=384,
        patch_size=16,
        hidden_size=1024,
        num_layers=24,
        num_heads=16,
        ffn_hidden_size=4096,
        pooling_head=True,
    ),
    "siglip-so400m-patch14-384": VisionConfig(pooling_head=True),
}


# --------------------------------------------------------------------------------------------
# Projector
# --------------------------------------------------------------------------------------------


#: Orders of a frame's merged visual tokens (:class:`ProjectorConfig`).
TOKEN_ORDERS = ("row_major", "column_major")


@dataclass
class ProjectorConfig:
    """The ``mlp_downsample`` projector: 2×2 patch merge, LayerNorm, Linear, GELU, Linear.

    ``token_order`` is the order of the merged tokens of a frame: ``row_major`` (current VILA
    code) or ``column_major`` (VILA code of 2024, which left the merged grid transposed; use it
    for checkpoints trained with that code). The four tokens inside a merged one are always
    concatenated as top-left, top-right, bottom-left, bottom-right.
    """

    kind: Literal["mlp_downsample"] = "mlp_downsample"
    token_order: Literal["row_major", "column_major"] = "row_major"
    layer_norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        _check(self.kind == "mlp_downsample", self, "kind", "only 'mlp_downsample' is built")
        _check(
            self.token_order in TOKEN_ORDERS,
            self,
            "token_order",
            "must be 'row_major' or 'column_major'",
        )
        _check(self.layer_norm_eps > 0, self, "layer_norm_eps", "must be > 0")

    @staticmethod
    def merged_grid_size(grid_size: int) -> int:
        """Merged tokens per side for a ``grid_size``² patch grid (odd grids are padded)."""
        return math.ceil(grid_size / 2)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ProjectorConfig:
        return _from_dict(cls, values)


# --------------------------------------------------------------------------------------------
# LLM
# --------------------------------------------------------------------------------------------


@dataclass
class RopeScaling:
    """RoPE frequency scaling, as transformers' ``rope_parameters`` define it.

    ``linear``: every frequency divided by ``factor`` (positions interpolated).
    ``llama3``: low frequencies (wavelength above ``original_max_position_embeddings /
    low_freq_factor``) divided by ``factor``, high ones (below ``.../high_freq_factor``) kept,
    a smooth blend in between.
    Dynamic NTK scaling is not offered: it rescales by the length of the running sequence, which
    is not defined for packed samples split over sequence-parallel ranks.
    """

    kind: Literal["linear", "llama3"]
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self) -> None:
        _check(self.kind in ("linear", "llama3"), self, "kind", "must be 'linear' or 'llama3'")
        _check(self.factor >= 1.0, self, "factor", "must be >= 1")
        if self.kind == "llama3":
            _check(
                self.high_freq_factor > self.low_freq_factor > 0,
                self,
                "high_freq_factor",
                f"must exceed low_freq_factor {self.low_freq_factor} > 0",
            )
            _positive(self, "original_max_position_embeddings")


@dataclass
class LLMConfig:
    """A Qwen2/Llama-style decoder: RMSNorm, SwiGLU MLP, RoPE, grouped-query attention.

    The embedding and output layer have ``padded_vocab_size`` rows (``vocab_size`` rounded up
    to ``vocab_pad_multiple``, so every tensor-parallel size dividing that multiple splits them
    evenly and checkpoints keep one shape across layouts); logits of the padding rows are masked
    out, so losses equal those of the unpadded model.
    """

    vocab_size: int = 152064
    hidden_size: int = 3584
    num_layers: int = 28
    num_heads: int = 28
    num_kv_heads: int = 4
    ffn_hidden_size: int = 18944
    head_dim: int | None = None  # None: hidden_size // num_heads
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    rope_scaling: RopeScaling | None = None
    qkv_bias: bool = True
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 32768
    vocab_pad_multiple: int = 128

    def __post_init__(self) -> None:
        if isinstance(self.rope_scaling, dict):
            self.rope_scaling = _from_dict(RopeScaling, self.rope_scaling)
        _positive(
            self,
            "vocab_size",
            "hidden_size",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "ffn_hidden_size",
            "max_position_embeddings",
            "vocab_pad_multiple",
        )
        _check(
            self.num_heads % self.num_kv_heads == 0,
            self,
            "num_kv_heads",
            f"must divide num_heads {self.num_heads}",
        )
        if self.head_dim is None:
            _check(
                self.hidden_size % self.num_heads == 0,
                self,
                "hidden_size",
                f"must be divisible by num_heads {self.num_heads} (or set head_dim)",
            )
        else:
            _positive(self, "head_dim")
        _check(self.kv_channels % 2 == 0, self, "head_dim", "RoPE needs an even head dimension")
        _check(self.rms_norm_eps > 0, self, "rms_norm_eps", "must be > 0")
        _check(self.rope_theta > 0, self, "rope_theta", "must be > 0")

    @property
    def kv_channels(self) -> int:
        """Dimension of one attention head."""
        return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_heads

    @property
    def padded_vocab_size(self) -> int:
        multiple = self.vocab_pad_multiple
        return math.ceil(self.vocab_size / multiple) * multiple

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> LLMConfig:
        return _preset(cls, LLM_PRESETS, name, overrides)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> LLMConfig:
        return _from_dict(cls, values)


LLM_PRESETS: dict[str, LLMConfig] = {
    # vocab 250 is padded to 256: the padding path runs in tests and the demo.
    "tiny": LLMConfig(
        vocab_size=250,
        hidden_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        ffn_hidden_size=128,
        rope_theta=10000.0,
        max_position_embeddings=4096,
        vocab_pad_multiple=64,
    ),
    "qwen2-1.5b": LLMConfig(
        vocab_size=151936,
        hidden_size=1536,
        num_layers=28,
        num_heads=12,
        num_kv_heads=2,
        ffn_hidden_size=8960,
        tie_word_embeddings=True,
        max_position_embeddings=131072,
    ),
    "qwen2-7b": LLMConfig(),
    "llama3-8b": LLMConfig(
        vocab_size=128256,
        hidden_size=4096,
        num_layers=32,
        num_heads=32,
        num_kv_heads=8,
        ffn_hidden_size=14336,
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
        qkv_bias=False,
        max_position_embeddings=8192,
    ),
    "llama3.1-8b": LLMConfig(
        vocab_size=128256,
        hidden_size=4096,
        num_layers=32,
        num_heads=32,
        num_kv_heads=8,
        ffn_hidden_size=14336,
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
        rope_scaling=RopeScaling(kind="llama3", factor=8.0),
        qkv_bias=False,
        max_position_embeddings=131072,
    ),
}


# --------------------------------------------------------------------------------------------
# Memory options
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MemoryConfig:
    """What the layers keep for the backward. Every option is exact (same losses and gradients);
    each trades stored tensors for elementwise recomputation, never for recomputing a layer
    (``parallel.recompute`` in the training config does that).

    ``loss_chunk_tokens``: the output layer and cross entropy run this many tokens at a time, so
    the loss holds one chunk's logits, not ``[s, V/tp]`` in fp32 (None: whole logits through
    megatron-core's ``vocab_parallel_cross_entropy``).
    ``recompute_activation``: the MLP keeps fc1's output only; the activation (SwiGLU, GELU) and
    the input of fc2 are recomputed from it in the backward.
    ``norm_keeps_input``: each norm keeps its input only; its output, which the next linear would
    keep again, is recomputed (megatron-core's selective "layernorm" recomputation).
    ``offload_layers``: the saved tensors of the first N LLM layers wait in host memory between
    forward and backward (CUDA only; nothing moves on CPU).
    """

    loss_chunk_tokens: int | None = 1024
    recompute_activation: bool = True
    norm_keeps_input: bool = True
    offload_layers: int = 0

    def __post_init__(self) -> None:
        if self.loss_chunk_tokens is not None:
            _positive(self, "loss_chunk_tokens")
        _check(
            isinstance(self.offload_layers, int) and self.offload_layers >= 0,
            self,
            "offload_layers",
            "must be an integer >= 0",
        )

    @classmethod
    def keep_everything(cls) -> MemoryConfig:
        """Every option off: the layers keep all their tensors (references and comparisons)."""
        return cls(loss_chunk_tokens=None, recompute_activation=False, norm_keeps_input=False)


# --------------------------------------------------------------------------------------------
# The whole model
# --------------------------------------------------------------------------------------------


@dataclass
class LongVILAConfig:
    """Vision tower + projector + LLM, and the ids of the ``<image>``/``<video>`` placeholders.

    Each frame becomes ``tokens_per_frame`` LLM tokens: ``ceil(grid/2)²`` after the projector's
    2×2 merge (196 for SigLIP so400m at 384 px). ``max_seq_length`` bounds a row of the batch
    after its placeholders are expanded (None: ``llm.max_position_embeddings``). ``memory``
    says what the layers keep for the backward (:class:`MemoryConfig`).
    """

    vision: VisionConfig = field(default_factory=VisionConfig)
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)
    image_token_id: int = 151646
    video_token_id: int = 151647
    max_seq_length: int | None = None
    memory: MemoryConfig = field(default_factory=MemoryConfig)

    def __post_init__(self) -> None:
        for name, cls in (
            ("vision", VisionConfig),
            ("projector", ProjectorConfig),
            ("memory", MemoryConfig),
        ):
            if isinstance(getattr(self, name), dict):
                setattr(self, name, _from_dict(cls, getattr(self, name)))
        if isinstance(self.llm, dict):
            self.llm = LLMConfig.from_dict(self.llm)
        for name in ("image_token_id", "video_token_id"):
            value = getattr(self, name)
            _check(
                isinstance(value, int) and 0 <= value < self.llm.vocab_size,
                self,
                name,
                f"must be a token id in [0, {self.llm.vocab_size})",
            )
        _check(
            self.image_token_id != self.video_token_id,
            self,
            "video_token_id",
            "must differ from image_token_id",
        )
        if self.max_seq_length is not None:
            _positive(self, "max_seq_length")

    @property
    def tokens_per_frame(self) -> int:
        return ProjectorConfig.merged_grid_size(self.vision.grid_size) ** 2

    @property
    def seq_length_limit(self) -> int:
        """The longest row (text + visual tokens) the model accepts."""
        return self.max_seq_length or self.llm.max_position_embeddings

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> LongVILAConfig:
        return _from_dict(cls, values)

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> LongVILAConfig:
        return _preset(cls, LONGVILA_PRESETS, name, overrides)

    @classmethod
    def from_preset(cls, name: str, overrides: dict[str, Any] | None = None) -> LongVILAConfig:
        """Preset ``name`` with nested ``overrides`` merged in, e.g.
        ``{"llm": {"rope_theta": 1.0e6}}`` changes one field of the LLM."""
        base = cls.preset(name).to_dict()
        return cls.from_dict(_merge(base, overrides or {}))


def _merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


LONGVILA_PRESETS: dict[str, LongVILAConfig] = {
    "tiny": LongVILAConfig(
        vision=VISION_PRESETS["tiny"],
        llm=LLM_PRESETS["tiny"],
        image_token_id=248,
        video_token_id=249,
    ),
    # SigLIP so400m at 384 px + a Qwen2-7B LLM: the LongVILA-7B architecture. The placeholder
    # ids follow Qwen2's 151646 tokenizer entries; set them from the tokenizer you train with.
    "longvila-qwen2-7b": LongVILAConfig(
        vision=VISION_PRESETS["siglip-so400m-patch14-384"],
        llm=LLM_PRESETS["qwen2-7b"],
    ),
    "longvila-llama3-8b": LongVILAConfig(
        vision=VISION_PRESETS["siglip-so400m-patch14-384"],
        llm=LLM_PRESETS["llama3-8b"],
        image_token_id=128256 - 2,
        video_token_id=128256 - 1,
    ),
}
