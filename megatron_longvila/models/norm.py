"""LayerNorm / RMSNorm for megatron-core layer specs, ready for TP sequence parallelism.

megatron-core's ``WrappedTorchNorm`` refuses ``sequence_parallel=True``. Under Megatron's TP
sequence parallelism a norm sees only this tensor-parallel rank's ``s/tp`` tokens, so the
gradient of its (replicated) weight is a partial sum: the parameters carry
``sequence_parallel = True`` and megatron-core's ``finalize_model_grads`` sums those gradients
over the tensor-parallel group, as it does for Transformer Engine's norms.

:class:`Norm` is the in-layer norm (``input_layernorm`` / ``pre_mlp_layernorm``), whose keys
the layer maps onto Transformer Engine's fused layernorm-linear names. :class:`FinalNorm` is a
block's final norm; like TE's norm it holds an (empty) ``_extra_state``, so both specs write the
same checkpoint keys.
"""

from __future__ import annotations

from typing import Any

import torch
from megatron.core.transformer.transformer_config import TransformerConfig


class Norm:
    """``torch.nn.LayerNorm`` or ``torch.nn.RMSNorm`` as ``config.normalization`` says, in
    ``config.params_dtype``, its parameters marked for the tensor-parallel gradient sum when
    ``config.sequence_parallel``.

    Same constructor as megatron-core's norms (``build_module`` passes config, hidden_size, eps).
    """

    def __new__(
        cls,
        config: TransformerConfig,
        hidden_size: int,
        eps: float = 1e-5,
        persist_layer_norm: bool = False,
        zero_centered_gamma: bool = False,
        normalization: str | None = None,
    ) -> torch.nn.Module:
        kinds = _final_kinds() if cls is FinalNorm else _layer_kinds()
        kind = normalization or config.normalization
        if kind not in kinds:
            raise ValueError(f"normalization {kind!r} is not one of {sorted(kinds)}")
        if config.layernorm_zero_centered_gamma or zero_centered_gamma:
            raise ValueError("zero-centered gamma is not supported by the torch norms")
        norm = kinds[kind](hidden_size, eps=eps, dtype=config.params_dtype)
        for param in norm.parameters():
            param.sequence_parallel = config.sequence_parallel
        return norm


class FinalNorm(Norm):
    """A block's final norm: :class:`Norm` with Transformer Engine's ``_extra_state`` key."""


class _NoExtraState:
    """Mixin: an empty ``_extra_state`` in the state dict, as Transformer Engine modules have
    (their FP8 metadata); loading ignores whatever is stored there."""

    def get_extra_state(self) -> None:
        return None

    def set_extra_state(self, state: Any) -> None:
        return None


class _LayerNormWithExtraState(_NoExtraState, torch.nn.LayerNorm):
    pass


class _RMSNormWithExtraState(_NoExtraState, torch.nn.RMSNorm):
    pass


def _layer_kinds() -> dict[str, type[torch.nn.Module]]:
    return {"LayerNorm": torch.nn.LayerNorm, "RMSNorm": torch.nn.RMSNorm}


def _final_kinds() -> dict[str, type[torch.nn.Module]]:
    return {"LayerNorm": _LayerNormWithExtraState, "RMSNorm": _RMSNormWithExtraState}
