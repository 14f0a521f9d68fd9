"""Our vision tower equals transformers' SiglipVisionModel at the selected layer.

Reference: ``SiglipVisionModel(...)(pixels, output_hidden_states=True).hidden_states[select]``
(eager attention, fp32) with random weights from a tiny config built here, its weights converted
by ``hf_mapping``. Tolerance: 1e-4 absolute on the features; HF → ours → HF is bit-identical
(the frozen tail — later layers, post-layernorm, pooling head — included). Runs on rank 0 of a
2-rank gloo pool (tensor-parallel size 1).
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from hf_models import hf_siglip

from megatron_longvila.convert.hf_mapping import (
    ConversionError,
    vision_config_from_hf,
    vision_config_to_hf,
    vision_state_from_hf,
)
from megatron_longvila.models.config import VisionConfig

# image 46 px / patch 14: a 3×3 grid with 4 px the conv never sees (as so400m's 384 px / 14)
TINY = VisionConfig.preset("tiny", image_size=46)


def _compare(cfg: VisionConfig) -> dict[str, float] | None:
    from megatron.core import parallel_state, tensor_parallel

    from megatron_longvila.convert.hf_mapping import load_full_state, vision_state_to_hf
    from megatron_longvila.models.vision import VisionTower

    parallel_state.initialize_model_parallel()
    if torch.distributed.get_rank() != 0:
        return None
    tensor_parallel.model_parallel_cuda_manual_seed(1)
    hf = hf_siglip(cfg)
    hf_state = {k: v.clone() for k, v in hf.state_dict().items()}
    ours = VisionTower(cfg).eval()
    load_full_state(ours, vision_state_from_hf(hf_state, cfg))
    pixels = torch.randn(3, cfg.num_channels, cfg.image_size, cfg.image_size)
    with torch.no_grad():
        ref = hf(pixel_values=pixels, output_hidden_states=True).hidden_states[cfg.select_layer]
        got = ours(pixels)
        # Guard: the selected layer is not interchangeable with its neighbour.
        other = hf(pixel_values=pixels, output_hidden_states=True).hidden_states[
            cfg.select_layer - 1 if cfg.select_layer < 0 else cfg.select_layer + 1
        ]
    back = vision_state_to_hf(ours.state_dict(), cfg)
    assert sorted(back) == sorted(hf_state), set(back) ^ set(hf_state)
    frozen = [n for n, p in ours.named_parameters() if not p.requires_grad]
    return {
        "shape_ok": tuple(got.shape) == (3, cfg.num_patches, cfg.hidden_size),
        "diff": (got - ref).abs().max().item(),
        "neighbour_diff": (other - ref).abs().max().item(),
        "feature_std": ref.std().item(),
        "round_trip_mismatches": sum(not torch.equal(back[k], hf_state[k]) for k in hf_state),
        "frozen": frozen,
    }


@pytest.mark.parametrize(
    "select_layer, pooling_head", [(-2, False), (-2, True), (-1, False), (1, False)]
)
def test_features_equal_transformers_hidden_state(ranks2, select_layer, pooling_head):
    cfg = replace(TINY, select_layer=select_layer, pooling_head=pooling_head)
    result = ranks2.run(_compare, cfg)[0]
    assert result["shape_ok"]
    assert result["feature_std"] > 0.5 and result["neighbour_diff"] > 0.1
    assert result["diff"] <= 1e-4, f"features differ from transformers by {result['diff']:.2e}"
    assert result["round_trip_mismatches"] == 0, "HF -> ours -> HF must be bit-identical"
    # Everything after the selected layer is frozen: it never runs, so it gets no gradient.
    # Those layers live in their own block (its own checkpoint key), numbered from 0.
    unused_layers = range(cfg.num_layers - cfg.num_layers_to_run)
    assert not any(n.startswith("encoder.layers.") for n in result["frozen"])
    assert {n.split(".")[2] for n in result["frozen"] if n.startswith("unused_layers.")} == {
        str(i) for i in unused_layers
    }
    assert any(n.startswith("encoder.final_layernorm") for n in result["frozen"])
    assert any(n.startswith("head.") for n in result["frozen"]) == pooling_head


def _gradients_with_and_without_recompute() -> list[dict[str, torch.Tensor]] | None:
    from megatron.core import parallel_state, tensor_parallel

    from megatron_longvila.core import platform
    from megatron_longvila.models.vision import VisionTower

    parallel_state.initialize_model_parallel()
    if torch.distributed.get_rank() != 0:
        return None
    recompute = {
        "recompute_granularity": "full",
        "recompute_method": "uniform",
        "recompute_num_layers": 1,
    }
    pixels = torch.randn(2, 3, TINY.image_size, TINY.image_size)
    grads = []
    for overrides in (None, recompute):
        tensor_parallel.model_parallel_cuda_manual_seed(1)
        platform.seed_everything(7)
        tower = VisionTower(TINY, transformer_overrides=overrides).train()
        (tower(pixels) ** 2).sum().backward()
        grads.append({n: p.grad for n, p in tower.named_parameters() if p.requires_grad})
    return grads


def test_activation_recompute_gives_the_same_gradients(ranks2):
    plain, recomputed = ranks2.run(_gradients_with_and_without_recompute)[0]
    assert plain.keys() == recomputed.keys()
    for name in plain:  # reference: the same tower without recompute; 1e-6 × largest entry
        scale = max(1.0, plain[name].abs().max().item())
        assert (plain[name] - recomputed[name]).abs().max().item() <= 1e-6 * scale, name


def _wrong_frame_size() -> str | None:
    from megatron.core import parallel_state

    from megatron_longvila.models.vision import VisionTower

    parallel_state.initialize_model_parallel()
    if torch.distributed.get_rank() != 0:
        return None
    try:
        VisionTower(TINY)(torch.zeros(2, 3, 42, 40))
    except ValueError as error:
        return str(error)
    return "no error"


def test_frames_of_the_wrong_size_are_refused(ranks2):
    assert ranks2.run(_wrong_frame_size)[0] == (
        "vision tower expects frames [n, 3, 46, 46], got (2, 3, 42, 40)"
    )


def test_config_round_trips_through_transformers():
    for cfg in (TINY, VisionConfig.preset("siglip-so400m-patch14-384")):
        assert vision_config_from_hf(vision_config_to_hf(cfg), cfg.select_layer) == cfg


def test_conversion_errors_name_the_tensor_and_shapes():
    state = hf_siglip(TINY).state_dict()
    missing = {k: v for k, v in state.items() if k != "encoder.layers.1.self_attn.k_proj.bias"}
    with pytest.raises(ConversionError, match=r"missing tensor 'encoder\.layers\.1\.self_attn"):
        vision_state_from_hf(missing, TINY)
    wrong = dict(state, **{"encoder.layers.0.mlp.fc1.weight": torch.zeros(64, 31)})
    with pytest.raises(
        ConversionError,
        match=r"'encoder\.layers\.0\.mlp\.fc1\.weight' has shape \(64, 31\), expected \(64, 32\)",
    ):
        vision_state_from_hf(wrong, TINY)
    extra = dict(state, **{"encoder.layers.9.mlp.fc1.weight": torch.zeros(1)})
    with pytest.raises(ConversionError, match=r"unexpected tensor\(s\) encoder\.layers\.9"):
        vision_state_from_hf(extra, TINY)
    # transformers 4 checkpoints name the same tensors with a "vision_model." prefix.
    prefixed = {f"vision_model.{k}": v for k, v in state.items()}
    assert vision_state_from_hf(prefixed, TINY).keys() == vision_state_from_hf(state, TINY).keys()
