"""VILA folders: the order of merged visual tokens comes from what the folder says, or is refused.

Reference: VILA's ``mlp_downsample`` projector written here from its published description, with
the 2024 (LongVILA release) ``DownSampleBlock``: pad an odd grid, fold column pairs into channels,
transpose, fold row pairs, and stop there, so the merged grid stays transposed (column-major);
the Dec 2024 (NVILA) code transposes it back (row-major). Channels are [TL, TR, BL, BR] in both.
The layers are torch modules fed the folder's own weights. Tolerance: 1e-6 absolute (fp32).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hf_models import hf_causal_lm, hf_siglip
from safetensors.torch import save_file

from megatron_longvila.checkpoint.layout import CheckpointError
from megatron_longvila.convert import ConversionError, HFSource, read_longvila_config
from megatron_longvila.convert.hf_source import read_longvila_weights
from megatron_longvila.models.config import LLMConfig, VisionConfig
from megatron_longvila.models.projector import MLPDownsampleProjector

VISION = VisionConfig.preset("tiny")  # 3×3 patches: the odd grid is padded to 2×2 merged tokens
LLM = LLMConfig.preset("tiny")
VILA_2024 = {"transformers_version": "4.37.2"}  # what VILA's 2024 code saved with
NVILA = {"transformers_version": "4.46.0", "dynamic_s2": False, "image_encoder": "{}"}


def vila_downsample(x: torch.Tensor, transpose_back: bool) -> torch.Tensor:
    """VILA's ``DownSampleBlock``: [n, g*g, c] -> [n, ceil(g/2)**2, 4c]."""
    n, patches, c = x.shape
    g = int(patches**0.5)
    x = x.reshape(n, g, g, c)
    if g % 2:
        x = torch.cat([x, x.new_zeros(n, 1, g, c)], dim=1)
        x = torch.cat([x, x.new_zeros(n, g + 1, 1, c)], dim=2)
    n, w, h, c = x.shape
    x = x.reshape(n, w, h // 2, 2 * c).permute(0, 2, 1, 3)
    x = x.reshape(n, h // 2, w // 2, 4 * c)
    if transpose_back:
        x = x.permute(0, 2, 1, 3)
    return x.reshape(n, -1, 4 * c)


def vila_projector(weights: dict[str, torch.Tensor], features: torch.Tensor, transpose_back: bool):
    merged, hidden = 4 * VISION.hidden_size, LLM.hidden_size
    layers = torch.nn.Sequential(
        torch.nn.Identity(),
        torch.nn.LayerNorm(merged),
        torch.nn.Linear(merged, hidden),
        torch.nn.GELU(),
        torch.nn.Linear(hidden, hidden),
    )
    layers.load_state_dict(weights)  # layers.1 LayerNorm, layers.2 / layers.4 Linear
    return layers(vila_downsample(features, transpose_back))


def write_vila_folder(folder: Path, top: dict, projector: dict) -> dict[str, torch.Tensor]:
    """A VILA-layout folder (llm/, vision_tower/, mm_projector/, config.json) of tiny random
    models; ``top`` / ``projector`` join the top-level / projector configs. Returns the
    projector's weights (VILA names without ``layers.``)."""
    from megatron_longvila.data.synthetic import build_tiny_tokenizer

    hf_causal_lm("qwen2", LLM).save_pretrained(folder / "llm")
    build_tiny_tokenizer(folder / "llm")
    hf_siglip(VISION).save_pretrained(folder / "vision_tower")
    gen = torch.Generator().manual_seed(3)
    merged, hidden = 4 * VISION.hidden_size, LLM.hidden_size
    shapes = {
        "1.weight": (merged,),
        "1.bias": (merged,),
        "2.weight": (hidden, merged),
        "2.bias": (hidden,),
        "4.weight": (hidden, hidden),
        "4.bias": (hidden,),
    }
    weights = {k: torch.randn(shape, generator=gen) * 0.5 for k, shape in shapes.items()}
    weights["1.weight"] += 1.0
    (folder / "mm_projector").mkdir()
    save_file(
        {f"layers.{k}": v for k, v in weights.items()},
        folder / "mm_projector" / "model.safetensors",
    )
    projector_config = {
        "architectures": ["MultimodalProjector"],
        "model_type": "v2l_projector",
        "mm_projector_type": "mlp_downsample",
        **projector,
    }
    (folder / "mm_projector" / "config.json").write_text(json.dumps(projector_config))
    top_config = {
        "architectures": ["LlavaLlamaModel"],
        "model_type": "llava_llama",
        "llm_cfg": {"_name_or_path": "llm"},
        "vision_tower_cfg": {"_name_or_path": "vision_tower"},
        "mm_projector_cfg": {"_name_or_path": "mm_projector"},
        "mm_vision_select_layer": -2,
        "num_video_frames": 8,
        **top,
    }
    (folder / "config.json").write_text(json.dumps(top_config))
    return weights


def _imported_projector(source: HFSource) -> MLPDownsampleProjector:
    cfg = read_longvila_config(source)
    state = read_longvila_weights(source, cfg)
    projector = MLPDownsampleProjector(cfg.projector, VISION.hidden_size, LLM.hidden_size)
    prefix = "mm_projector."
    projector.load_state_dict(
        {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
    )
    return projector


@pytest.mark.parametrize(
    ("top", "projector", "transpose_back"),
    [
        (VILA_2024, VILA_2024, False),  # LongVILA 2024 release: column-major
        ({}, VILA_2024, False),  # a plain projector folder saved by that code
        (NVILA, {"transformers_version": "4.46.0"}, True),  # Dec 2024 on: row-major
        ({}, {"token_order": "column_major"}, False),  # our own export says it
    ],
)
def test_vila_folders_import_with_their_token_order(tmp_path, top, projector, transpose_back):
    weights = write_vila_folder(tmp_path, top, projector)
    features = torch.randn(3, VISION.num_patches, VISION.hidden_size)
    ours = _imported_projector(HFSource.from_folder(tmp_path))(features)
    reference = vila_projector(weights, features, transpose_back)
    torch.testing.assert_close(ours, reference, atol=1e-6, rtol=0)
    # The other order is far off: the check above can tell them apart.
    assert (ours - vila_projector(weights, features, not transpose_back)).abs().max() > 0.1


def test_a_folder_that_cannot_tell_is_refused_and_the_option_decides(tmp_path):
    from megatron_longvila.eval.cli import parse_args as eval_args
    from megatron_longvila.inference.generate import parse_args as generate_args
    from megatron_longvila.inference.loading import resolve_checkpoint

    weights = write_vila_folder(tmp_path, {}, {})
    message = r"cannot tell the order of the merged visual tokens.*--token-order.*init\.token_order"
    with pytest.raises(ConversionError, match=message):
        read_longvila_config(HFSource.from_folder(tmp_path))
    with pytest.raises(CheckpointError, match=message):  # longvila-generate / longvila-eval
        resolve_checkpoint(tmp_path)

    given = HFSource.from_folder(tmp_path, token_order="column_major")
    features = torch.randn(2, VISION.num_patches, VISION.hidden_size)
    torch.testing.assert_close(
        _imported_projector(given)(features),
        vila_projector(weights, features, transpose_back=False),
        atol=1e-6,
        rtol=0,
    )
    assert resolve_checkpoint(tmp_path, "column_major").config.projector.token_order == (
        "column_major"
    )
    common = ["--checkpoint", str(tmp_path), "--token-order", "column_major"]
    assert generate_args([*common, "--prompt", "hi"]).token_order == "column_major"
    videomme = ["videomme", *common, "--questions", "q.json", "--videos", "v", "--output", "o"]
    assert eval_args(videomme).token_order == "column_major"


def test_training_from_a_vila_folder_takes_its_token_order(tmp_path):
    from megatron_longvila.training.config import load_train_config
    from megatron_longvila.training.config_io import ConfigError

    write_vila_folder(tmp_path / "vila", {}, {})
    (tmp_path / "shards" / ".nv-meta").mkdir(parents=True)
    (tmp_path / "shards" / ".nv-meta" / "dataset.yaml").write_text("sample_type: {}\n")
    stage = tmp_path / "stage.yaml"
    stage.write_text(
        f"run: {{output_dir: {tmp_path}/run, train_steps: 2}}\n"
        f"init: {{hf: {tmp_path}/vila}}\n"
        f"data: {{dataset_path: {tmp_path}/shards, tokenizer_path: {tmp_path}/vila/llm, "
        "max_seq_length: 64}\n"
    )
    with pytest.raises(ConfigError, match=r"init\.hf: .*cannot tell.*init\.token_order"):
        load_train_config(stage, world_size=1)
    config = load_train_config(stage, ["init.token_order=column_major"], world_size=1)
    assert config.architecture().projector.token_order == "column_major"
    with pytest.raises(ConfigError, match=r"init\.hf .* was trained with 'column_major'"):
        load_train_config(
            stage,
            [
                "init.token_order=column_major",
                "model.overrides={projector: {token_order: row_major}}",
            ],
            world_size=1,
        )
    with pytest.raises(ConfigError, match=r"token_order is for a Hugging Face folder"):
        load_train_config(stage, ["init.hf=null", "init.token_order=row_major"], world_size=1)


def _start_from_hf(folder: str) -> dict:
    """This rank's projector weights after a model + megatron optimizer are started from
    ``folder`` as the trainer starts from ``init.hf`` (fp32: megatron's bf16 optimizer, whose
    fp32 main copies ``load_initial_weights`` also refreshes, takes CUDA tensors only)."""
    from megatron.core import parallel_state
    from megatron.core.distributed import DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from megatron_longvila.models.longvila_step import build_longvila_model
    from megatron_longvila.training.config import InitConfig
    from megatron_longvila.training.trainer import load_initial_weights

    parallel_state.initialize_model_parallel()
    cfg = read_longvila_config(HFSource.from_folder(folder, token_order="column_major"))
    ddp = DistributedDataParallelConfig(grad_reduce_in_fp32=True)
    model = build_longvila_model(cfg, ddp_config=ddp, seed=99)
    optimizer = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=1e-3), model)
    load_initial_weights(InitConfig(hf=folder, token_order="column_major"), model, optimizer)
    state = model[0].module.state_dict()
    return {k: v.clone() for k, v in state.items() if k.startswith("mm_projector.")}


def test_training_starts_from_the_folders_weights(tmp_path, rank_pools):
    weights = write_vila_folder(tmp_path, {}, {})
    loaded = rank_pools(2).run(_start_from_hf, str(tmp_path))[0]
    vila_names = {"norm": "1", "fc1": "2", "fc2": "4"}
    for name, value in loaded.items():
        module, kind = name.removeprefix("mm_projector.").split(".")
        assert torch.equal(value, weights[f"{vila_names[module]}.{kind}"]), name
