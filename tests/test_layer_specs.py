"""Layer specs by device, one checkpoint format, and the device decisions around them.

* Checkpoint keys: the local spec's distributed-checkpoint keys (LLM and vision tower) equal the
  keys a Transformer Engine spec writes. Reference, written out here from Transformer Engine's
  module parameters (read in TE 2.20's source) and megatron-core's
  ``get_gpt_layer_with_transformer_engine_spec`` (read in mcore 0.16.1): the norm before
  attention and before the MLP live inside ``TELayerNormColumnParallelLinear`` as
  ``layer_norm_weight`` / ``layer_norm_bias`` of ``linear_qkv`` / ``linear_fc1``; every TE linear
  and ``TENorm`` holds an ``_extra_state``; linears have ``weight`` and, with biases, ``bias``.
* Which spec: Transformer Engine on CUDA with TE importable, else local; ``MLV_LAYER_SPEC``
  forces one and a forced ``te`` without TE is refused.
* Weight init: CPU draws full weights on the host (identical in every layout); CUDA draws on the
  device, and only allocates when the weights will be loaded.
* The norm module under TP sequence parallelism marks its parameters for the tensor-parallel
  gradient sum; the padded length multiple includes tp under TP sequence parallelism.
"""

from __future__ import annotations

import pytest
import torch

from megatron_longvila.core import platform
from megatron_longvila.core.topology import MMSPTopology, sequence_multiple
from megatron_longvila.models.config import LLMConfig, VisionConfig

LLM_CFG = LLMConfig.preset("tiny", num_layers=2)  # RMSNorm, qkv bias, no other linear bias
VISION_CFG = VisionConfig.preset("tiny")  # LayerNorm, biases everywhere, one unused layer


def _te_linear(name: str, bias: bool, norm: str | None = None) -> set[str]:
    """Checkpoint names of a TE linear (``norm``: the LayerNorm/RMSNorm fused in front)."""
    names = {f"{name}.weight", f"{name}._extra_state"}
    if bias:
        names.add(f"{name}.bias")
    if norm is not None:
        names.add(f"{name}.layer_norm_weight")
        if norm == "LayerNorm":
            names.add(f"{name}.layer_norm_bias")
    return names


def _te_block(prefix: str, norm: str, qkv_bias: bool, bias: bool, final_norm: bool) -> set[str]:
    """Keys of a TE-spec TransformerBlock: megatron stacks the layers under one key."""
    layer = (
        _te_linear("self_attention.linear_qkv", qkv_bias, norm)
        | _te_linear("self_attention.linear_proj", bias)
        | _te_linear("mlp.linear_fc1", bias, norm)
        | _te_linear("mlp.linear_fc2", bias)
    )
    keys = {f"{prefix}.layers.{name}" for name in layer}
    if final_norm:
        keys |= {f"{prefix}.final_layernorm.weight", f"{prefix}.final_layernorm._extra_state"}
        if norm == "LayerNorm":
            keys.add(f"{prefix}.final_layernorm.bias")
    return keys


def expected_te_keys() -> dict[str, set[str]]:
    llm = _te_block("decoder", "RMSNorm", qkv_bias=True, bias=False, final_norm=True)
    llm |= {"embedding.word_embeddings.weight", "output_layer.weight", "output_layer._extra_state"}
    vision = _te_block("encoder", "LayerNorm", qkv_bias=True, bias=True, final_norm=True)
    vision |= _te_block("unused_layers", "LayerNorm", qkv_bias=True, bias=True, final_norm=False)
    vision |= {"patch_embedding.weight", "patch_embedding.bias", "position_embedding.weight"}
    return {"llm": llm, "vision": vision}


def local_spec_keys() -> dict[str, set[str]]:
    """Checkpoint keys (``ShardedTensor.key``/``ShardedObject.key``) of the local-spec models."""
    from megatron.core import parallel_state, tensor_parallel

    from megatron_longvila.models.llm import LanguageModel
    from megatron_longvila.models.vision import VisionTower

    parallel_state.initialize_model_parallel()
    tensor_parallel.model_parallel_cuda_manual_seed(1)
    assert platform.layer_spec_backend() == "local"
    models = {"llm": LanguageModel(LLM_CFG), "vision": VisionTower(VISION_CFG)}
    return {name: {v.key for v in m.sharded_state_dict().values()} for name, m in models.items()}


def test_local_spec_writes_transformer_engine_keys(ranks2):
    assert LLM_CFG.qkv_bias and not LLM_CFG.tie_word_embeddings  # what expected_te_keys assumes
    assert VISION_CFG.num_layers_to_run == VISION_CFG.num_layers - 1
    got = ranks2.run(local_spec_keys)[0]
    expected = expected_te_keys()
    for name in ("llm", "vision"):
        assert got[name] == expected[name], (
            name,
            sorted(got[name] - expected[name]),
            sorted(expected[name] - got[name]),
        )


# ---- which spec, which init --------------------------------------------------------------------


def test_layer_spec_backend_by_device(monkeypatch):
    monkeypatch.delenv(platform.LAYER_SPEC_ENV, raising=False)
    monkeypatch.setattr(platform, "transformer_engine_available", lambda: False)
    assert platform.layer_spec_backend() == "local"
    monkeypatch.setattr(platform, "transformer_engine_available", lambda: True)
    assert platform.layer_spec_backend() == "te"
    monkeypatch.setenv(platform.LAYER_SPEC_ENV, "local")
    assert platform.layer_spec_backend() == "local"


def test_forced_layer_spec_is_checked(monkeypatch):
    monkeypatch.setattr(platform, "cuda_available", lambda: False)
    monkeypatch.setattr(platform, "transformer_engine_available", lambda: False)
    monkeypatch.setenv(platform.LAYER_SPEC_ENV, "te")
    with pytest.raises(RuntimeError, match=r"MLV_LAYER_SPEC=te needs Transformer Engine.*CUDA"):
        platform.layer_spec_backend()
    monkeypatch.setattr(platform, "cuda_available", lambda: True)
    with pytest.raises(RuntimeError, match="an importable transformer_engine"):
        platform.layer_spec_backend()
    monkeypatch.setenv(platform.LAYER_SPEC_ENV, "apex")
    with pytest.raises(ValueError, match=r"MLV_LAYER_SPEC='apex' is not one of \('local', 'te'\)"):
        platform.layer_spec_backend()


def test_transformer_engine_needs_cuda(monkeypatch):
    monkeypatch.setattr(platform, "cuda_available", lambda: False)
    assert not platform.transformer_engine_available()


def test_weight_init_by_device(monkeypatch):
    monkeypatch.setattr(platform, "cuda_available", lambda: False)
    for loaded in (False, True):  # CPU: the same full tensors in every layout, loaded or not
        assert platform.weight_init_options(loaded) == {
            "use_cpu_initialization": True,
            "perform_initialization": True,
        }
    assert platform.portable_transformer_options()["use_cpu_initialization"] is True
    monkeypatch.setattr(platform, "cuda_available", lambda: True)
    assert platform.weight_init_options(False) == {
        "use_cpu_initialization": False,
        "perform_initialization": True,
    }
    assert platform.weight_init_options(True) == {
        "use_cpu_initialization": False,
        "perform_initialization": False,
    }


# ---- the norm and the padding under TP sequence parallelism -----------------------------------


def _config(sequence_parallel: bool, normalization: str):
    from megatron.core.transformer.transformer_config import TransformerConfig

    return TransformerConfig(
        num_layers=1,
        hidden_size=8,
        num_attention_heads=2,
        normalization=normalization,
        tensor_model_parallel_size=2 if sequence_parallel else 1,
        sequence_parallel=sequence_parallel,
        **platform.portable_transformer_options(),
    )


@pytest.mark.parametrize("normalization", ["LayerNorm", "RMSNorm"])
def test_norm_marks_its_parameters_under_sequence_parallelism(normalization):
    from megatron_longvila.models.norm import FinalNorm, Norm

    for sp in (False, True):
        norm = Norm(_config(sp, normalization), 8, eps=1e-6)
        expected = torch.nn.LayerNorm if normalization == "LayerNorm" else torch.nn.RMSNorm
        assert isinstance(norm, expected) and norm.eps == 1e-6
        params = list(norm.parameters())
        assert len(params) == (2 if normalization == "LayerNorm" else 1)
        assert all(p.sequence_parallel is sp for p in params)
        assert "_extra_state" not in norm.state_dict()  # mapped onto TE's fused linear names
        final = FinalNorm(_config(sp, normalization), 8)
        assert isinstance(final, expected) and "_extra_state" in final.state_dict()
        assert all(p.sequence_parallel is sp for p in final.parameters())
        x = torch.randn(3, 8)
        assert torch.equal(final(x), expected(8, eps=1e-5)(x))  # fresh weights: 1 (and 0)


def test_norm_refuses_what_it_cannot_do():
    from megatron_longvila.models.norm import Norm

    with pytest.raises(ValueError, match="normalization 'L2Norm' is not one of"):
        Norm(_config(False, "LayerNorm"), 8, normalization="L2Norm")
    with pytest.raises(ValueError, match="zero-centered gamma"):
        Norm(_config(False, "LayerNorm"), 8, zero_centered_gamma=True)


def test_padded_length_multiple():
    assert sequence_multiple(4) == 8
    assert sequence_multiple(2, 2) == 8
    assert MMSPTopology(tp=2, ulysses=2, ring=2).sequence_multiple(sequence_parallel=True) == 16
    assert MMSPTopology(tp=2, ulysses=2, ring=2).sequence_multiple(sequence_parallel=False) == 8
    with pytest.raises(ValueError, match="tp_sequence_split must be at least 1, got 0"):
        sequence_multiple(2, 0)


def test_transformer_engine_spec_turns_on_the_fusions_the_model_can_take(monkeypatch):
    """Under the TE spec the LLM (SwiGLU) gets megatron's fused bias-SwiGLU; the vision tower
    (tanh-GELU, which megatron cannot fuse) and the local spec do not."""
    from types import SimpleNamespace

    from megatron_longvila.models.llm import llm_transformer_config
    from megatron_longvila.models.vision import vision_transformer_config

    groups = SimpleNamespace(tp=None, pp=None)  # groups of one
    for backend, fused in (("local", False), ("te", True)):
        monkeypatch.setattr(platform, "layer_spec_backend", lambda backend=backend: backend)
        llm = llm_transformer_config(LLM_CFG, groups, torch.float32)
        vision = vision_transformer_config(VISION_CFG, groups, torch.float32)
        assert llm.bias_activation_fusion is fused and not vision.bias_activation_fusion
        assert not llm.apply_rope_fusion and not llm.sequence_parallel  # tp = 1


@pytest.mark.gpu
@pytest.mark.skipif(
    not platform.transformer_engine_available(), reason="needs CUDA and Transformer Engine"
)
def test_te_layer_spec_uses_the_modules_of_megatrons_te_spec():
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_layer_with_transformer_engine_spec,
    )

    from megatron_longvila.models.transformer import te_layer_spec

    ours = te_layer_spec().submodules
    theirs = get_gpt_layer_with_transformer_engine_spec().submodules
    for name in ("input_layernorm", "pre_mlp_layernorm"):
        assert getattr(ours, name) is getattr(theirs, name), name
    ours_attn, theirs_attn = ours.self_attention.submodules, theirs.self_attention.submodules
    assert ours_attn.linear_qkv is theirs_attn.linear_qkv
    assert ours_attn.linear_proj is theirs_attn.linear_proj
    assert ours.mlp.submodules.linear_fc1 is theirs.mlp.submodules.linear_fc1
    assert ours.mlp.submodules.linear_fc2 is theirs.mlp.submodules.linear_fc2
