"""Checkpoint conversion Megatron ↔ Hugging Face, checked against transformers.

Each variant starts from transformers models with random weights made here (a Qwen2 or Llama
``...ForCausalLM``, a ``SiglipVisionModel`` with its pooling head, both saved by
``save_pretrained``) and a VILA-named projector, and goes:

1. HF → megatron dist checkpoint written at TP=2 (× PP=2 for Qwen2) by ``hf_to_megatron`` on the
   ranks of a gloo pool (the torchrun path); then the checkpoint is loaded back in that layout by
   megatron's own ``dist_checkpointing`` (``CheckpointManager.load``) and run;
2. that checkpoint → HF folder by ``megatron_to_hf`` (one process);
3. the exported folder → a dist checkpoint at TP=1/PP=1, loaded and run the same way.

References and tolerances (fp32):
* transformers' ``Qwen2ForCausalLM`` / ``LlamaForCausalLM`` loaded from the exported ``llm/``:
  logits ≤ 1e-4 absolute against our LLM run at TP=2 (× PP=2) through megatron's schedule;
* transformers' ``SiglipVisionModel`` from ``vision_tower/``: ``hidden_states[select_layer]``
  ≤ 1e-4 against our vision tower at TP=2;
* HF → Megatron → HF: every exported tensor bit-identical to the file it came from;
* the TP=1/PP=1 model on the exported folder: the same loss on two multimodal micro-batches as
  the TP=2 (× PP=2) model, ≤ 1e-5.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hf_models import hf_causal_lm, hf_siglip
from longvila_batches import make_batch, micro_batches
from safetensors.torch import load_file, save_file

from megatron_longvila.checkpoint.layout import CheckpointError
from megatron_longvila.checkpoint.train_state import MODEL_CONFIG_KEY
from megatron_longvila.convert import ConversionError, HFSource, hf_to_megatron, megatron_to_hf
from megatron_longvila.convert.safetensors_io import read_safetensors
from megatron_longvila.models.config import LLMConfig, LongVILAConfig, VisionConfig

VISION = VisionConfig.preset("tiny", pooling_head=True)  # 3 layers, select -2: 1 never runs
SETTINGS = {"image_token_id": 248, "video_token_id": 249, "vocab_pad_multiple": 64}
LLAMA3_ROPE = {
    "kind": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,
}
VARIANTS = {  # name: (architecture, LLM config (vocab 250 → 256 rows), tp, pp)
    "qwen2-tied-tp2-pp2": ("qwen2", LLMConfig.preset("tiny", tie_word_embeddings=True), 2, 2),
    "llama-gqa-tp2": (
        "llama",
        LLMConfig.preset("tiny", qkv_bias=False, rope_scaling=LLAMA3_ROPE),
        2,
        1,
    ),
}
TOLERANCE_HF = 1e-4
TOLERANCE_LOSS = 1e-5


# ---- the source: transformers models saved by transformers --------------------------------


def _projector_tensors(gen: torch.Generator) -> dict[str, torch.Tensor]:
    merged, hidden = 4 * VISION.hidden_size, LLMConfig.preset("tiny").hidden_size
    shapes = {
        "layers.1.weight": (merged,),
        "layers.1.bias": (merged,),
        "layers.2.weight": (hidden, merged),
        "layers.2.bias": (hidden,),
        "layers.4.weight": (hidden, hidden),
        "layers.4.bias": (hidden,),
    }
    return {name: torch.randn(shape, generator=gen) * 0.2 for name, shape in shapes.items()}


def write_hf_source(folder: Path, architecture: str, llm_cfg: LLMConfig) -> HFSource:
    """Plain ``save_pretrained`` folders of random transformers models + a VILA projector."""
    from megatron_longvila.data.synthetic import build_tiny_tokenizer

    llm = hf_causal_lm(architecture, llm_cfg)
    with torch.no_grad():  # transformers leaves q/k/v biases at 0: a dropped bias would hide
        for name, p in llm.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.2)
    llm.save_pretrained(folder / "llm")
    build_tiny_tokenizer(folder / "llm")
    hf_siglip(VISION).save_pretrained(folder / "siglip")
    (folder / "projector").mkdir()
    save_file(
        _projector_tensors(torch.Generator().manual_seed(4)),
        folder / "projector" / "model.safetensors",
    )
    (folder / "projector" / "config.json").write_text(
        json.dumps({"mm_projector_type": "mlp_downsample", "token_order": "row_major"}),
        encoding="utf-8",
    )
    return HFSource.from_parts(folder / "llm", folder / "siglip", folder / "projector", **SETTINGS)


# ---- on the ranks ---------------------------------------------------------------------------

PIXELS_SEED = 21


def _text_batch(cfg: LongVILAConfig):
    """Two rows of one text-only sample each (8–14 tokens, right-padded)."""
    return make_batch([[[]], [[]]], seed=31, cfg=cfg)


def _forward_only(model, batches, step):
    from megatron.core.pipeline_parallel import get_forward_backward_func

    return get_forward_backward_func()(
        forward_step_func=step,
        data_iterator=iter(batches),
        model=[model],
        num_microbatches=len(batches),
        seq_length=0,  # variable: the stages exchange shapes
        micro_batch_size=batches[0].batch_size,
        forward_only=True,
        collect_non_loss_data=step is _logits_step,
    )


def _logits_step(data_iterator, model):
    """Forward step returning logits (last stage) as megatron's non-loss data."""
    batch = next(data_iterator)
    output = model(model.prepare_inputs(batch), return_logits=True)
    return output, lambda out, non_loss_data=False: out


def evaluate_checkpoint(root: str, tp: int, pp: int) -> dict:
    """Load ``root`` in the tp × pp layout with megatron's loader; logits of a text batch, vision
    features of random frames, and the loss of two multimodal micro-batches."""
    from megatron.core import parallel_state

    from megatron_longvila.checkpoint.manager import CheckpointManager
    from megatron_longvila.core.parallel_state import MMSPTopology, initialize_mmsp
    from megatron_longvila.models.longvila_step import build_longvila_model, forward_step

    initialize_mmsp(MMSPTopology(tp=tp, pp=pp))
    manager = CheckpointManager(root)
    state = json.loads((manager.latest_dir() / "train_state.json").read_text())
    cfg = LongVILAConfig.from_dict(state[MODEL_CONFIG_KEY])
    (model,) = build_longvila_model(cfg)
    model.load_state_dict(manager.load({"model": model.sharded_state_dict()}).sharded["model"])
    model.eval()
    out: dict = {"cfg": cfg.to_dict()}
    with torch.no_grad():
        if model.pre_process:
            size = cfg.vision.image_size
            gen = torch.Generator().manual_seed(PIXELS_SEED)
            out["pixels"] = torch.randn(3, cfg.vision.num_channels, size, size, generator=gen)
            out["features"] = model.vision_tower(out["pixels"])
        logits = _forward_only(model, [_text_batch(cfg)], _logits_step)
        reports = _forward_only(model, micro_batches(cfg), forward_step)
    if parallel_state.is_pipeline_last_stage():
        out["logits"] = logits[0]
        total = sum(r["lm loss"] for r in reports)
        out["loss"] = float(total[0] / total[1])
    return out


def convert_and_evaluate(source: HFSource, root: str, tp: int, pp: int) -> dict:
    directory = hf_to_megatron(source, root, tp=tp, pp=pp)
    return {"directory": str(directory), **evaluate_checkpoint(root, tp, pp)}


def _merged(results: list[dict]) -> dict:
    """One dict of what the ranks returned (first stage: features; last stage: logits, loss)."""
    merged: dict = {}
    for result in results:
        for key, value in result.items():
            merged.setdefault(key, value)
    return merged


# ---- the conversions, once per variant -------------------------------------------------------


_CONVERSIONS: dict[str, dict] = {}


def conversion(variant: str, rank_pools, tmp_path_factory) -> dict:
    """Steps 1–3 of the module docstring for ``variant``, done once per test session."""
    if variant in _CONVERSIONS:
        return _CONVERSIONS[variant]
    architecture, llm_cfg, tp, pp = VARIANTS[variant]
    tmp = tmp_path_factory.mktemp(variant)
    source = write_hf_source(tmp / "source", architecture, llm_cfg)
    pool = rank_pools(tp * pp)
    parallel = _merged(pool.run(convert_and_evaluate, source, str(tmp / "megatron"), tp, pp))
    megatron_to_hf(tmp / "megatron", tmp / "hf")
    single = _merged(
        pool.run(convert_and_evaluate, HFSource.from_folder(tmp / "hf"), str(tmp / "tp1"), 1, 1)
    )
    _CONVERSIONS[variant] = {
        "variant": variant,
        "architecture": architecture,
        "source": source,
        "hf": tmp / "hf",
        "megatron": tmp / "megatron",
        "parallel": parallel,
        "single": single,
    }
    return _CONVERSIONS[variant]


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def converted(request, rank_pools, tmp_path_factory) -> dict:
    return conversion(request.param, rank_pools, tmp_path_factory)


@pytest.fixture(scope="module")
def llama_converted(rank_pools, tmp_path_factory) -> dict:
    return conversion("llama-gqa-tp2", rank_pools, tmp_path_factory)


def test_hf_to_megatron_to_hf_is_bit_identical(converted):
    source, hf = converted["source"], converted["hf"]
    for original, exported in (
        (source.llm, hf / "llm"),
        (source.vision_tower, hf / "vision_tower"),
        (source.mm_projector, hf / "mm_projector"),
    ):
        before, after = read_safetensors(original), read_safetensors(exported)
        assert sorted(before) == sorted(after), set(before) ^ set(after)
        changed = [k for k in before if not torch.equal(before[k], after[k])]
        assert not changed, f"{exported.name}: {changed}"


def test_exported_llm_gives_our_logits_in_transformers(converted):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ours = converted["parallel"]["logits"]  # [b, s, vocab] from the TP=2 (× PP=2) checkpoint
    cfg = LongVILAConfig.from_dict(converted["parallel"]["cfg"])
    batch = _text_batch(cfg)
    hf = AutoModelForCausalLM.from_pretrained(converted["hf"] / "llm", attn_implementation="eager")
    expected = {"qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM"}
    assert type(hf).__name__ == expected[converted["architecture"]]
    with torch.no_grad():
        for row in range(batch.batch_size):
            n = int((batch.segment_ids[row] >= 0).sum())
            reference = hf(input_ids=batch.input_ids[row : row + 1, :n]).logits[0]
            assert reference.std() > 0.5, "logits must be O(1) for 1e-4 to mean something"
            diff = (ours[row, :n] - reference).abs().max().item()
            assert diff <= TOLERANCE_HF, f"row {row}: logits differ from transformers by {diff:.2e}"
    tokenizer = AutoTokenizer.from_pretrained(converted["hf"] / "llm")
    source_tokenizer = AutoTokenizer.from_pretrained(converted["source"].llm)
    text = "a red square moves left <video> then up"
    assert tokenizer(text).input_ids == source_tokenizer(text).input_ids


def test_exported_vision_tower_gives_our_features_in_transformers(converted):
    from transformers import SiglipVisionModel

    parallel = converted["parallel"]
    hf = SiglipVisionModel.from_pretrained(
        converted["hf"] / "vision_tower", attn_implementation="eager"
    )
    with torch.no_grad():
        hidden = hf(pixel_values=parallel["pixels"], output_hidden_states=True).hidden_states
    reference = hidden[VISION.select_layer]
    assert (hidden[VISION.select_layer - 1] - reference).abs().max() > 0.1  # layers differ
    diff = (parallel["features"] - reference).abs().max().item()
    assert diff <= TOLERANCE_HF, f"features differ from transformers by {diff:.2e}"


def test_parallel_checkpoint_and_its_tp1_reimport_give_the_same_loss(converted):
    parallel, single = converted["parallel"], converted["single"]
    assert parallel["cfg"] == single["cfg"], "the architecture survives the round trip"
    assert abs(parallel["loss"] - single["loss"]) <= TOLERANCE_LOSS, (parallel["loss"], single)
    assert parallel["directory"].endswith("iter_0000000")


def test_exported_folder_layout(converted):
    hf = converted["hf"]
    top = json.loads((hf / "config.json").read_text())
    cfg = LongVILAConfig.from_dict(converted["parallel"]["cfg"])
    assert top["llm_cfg"]["_name_or_path"] == "llm"
    assert top["vision_tower_cfg"]["architectures"] == ["SiglipVisionModel"]
    assert top["mm_projector_cfg"]["_name_or_path"] == "mm_projector"
    assert (top["image_token_id"], top["video_token_id"]) == (248, 249)
    assert top["mm_vision_select_layer"] == -2 and top["image_size"] == VISION.image_size
    assert top["rope_parameters"]["rope_theta"] == cfg.llm.rope_theta
    assert top["num_video_frames"] == 8  # nothing recorded: the data pipeline's default
    projector = json.loads((hf / "mm_projector" / "config.json").read_text())
    assert projector["mm_projector_type"] == "mlp_downsample"
    assert (hf / "vision_tower" / "preprocessor_config.json").is_file()
    assert (hf / "llm" / "tokenizer.json").is_file()
    # What the source LLM's config said beyond the architecture comes back (the source has a
    # non-default initializer_range); the tokenizer's pad id fills in what the source left empty.
    source_llm = json.loads((converted["source"].llm / "config.json").read_text())
    exported_llm = json.loads((hf / "llm" / "config.json").read_text())
    for key in ("initializer_range", "attention_dropout", "use_cache"):
        assert exported_llm[key] == source_llm[key], key
    assert source_llm["pad_token_id"] is None and exported_llm["pad_token_id"] == 0


# ---- loading HF weights straight into a model; what a rank refuses ------------------------


def load_in_memory_and_compare(hf_folder: str, root: str, tp: int, pp: int) -> dict:
    """A model filled by ``load_hf_into_model`` vs one loaded from the converted checkpoint by
    megatron; then the messages of a fill lacking a tensor and of one with a wrong shape."""
    from megatron_longvila.checkpoint.manager import CheckpointManager
    from megatron_longvila.convert import load_hf_into_model
    from megatron_longvila.convert.full_tensors import TensorsInMemory, load_full_tensors_into
    from megatron_longvila.convert.hf_source import read_longvila_weights
    from megatron_longvila.core.parallel_state import MMSPTopology, initialize_mmsp
    from megatron_longvila.models.longvila_step import build_longvila_model

    initialize_mmsp(MMSPTopology(tp=tp, pp=pp))
    source = HFSource.from_folder(hf_folder)
    cfg = LongVILAConfig.from_dict(
        json.loads((Path(root) / "iter_0000000" / "train_state.json").read_text())[MODEL_CONFIG_KEY]
    )
    (in_memory,) = build_longvila_model(cfg, seed=1)
    load_hf_into_model(in_memory, source)
    (from_checkpoint,) = build_longvila_model(cfg, seed=2)
    loaded = CheckpointManager(root).load({"model": from_checkpoint.sharded_state_dict()})
    from_checkpoint.load_state_dict(loaded.sharded["model"])
    theirs = from_checkpoint.state_dict()
    mismatches = [
        name
        for name, tensor in in_memory.state_dict().items()
        if tensor is not None and not torch.equal(tensor, theirs[name])
    ]

    try:  # rank 0 stages; the others learn that it failed instead of waiting forever
        hf_to_megatron(HFSource.from_parts(f"{root}/nowhere", hf_folder), f"{root}/never", tp=tp)
        staging_error = None
    except ConversionError as error:
        staging_error = str(error)

    full = read_longvila_weights(source, cfg)
    messages = {}
    name = "llm.decoder.final_layernorm.weight"  # on the last stage
    for case, tensors in {
        "missing": {k: v for k, v in full.items() if k != name},
        "misshapen": {**full, name: full[name][:-1]},
    }.items():
        try:
            load_full_tensors_into(in_memory, TensorsInMemory(tensors))
            messages[case] = None
        except ConversionError as error:
            messages[case] = str(error)
    return {
        "mismatches": mismatches,
        "messages": messages,
        "last": in_memory.post_process,
        "staging_error": staging_error,
    }


def test_hf_weights_load_into_a_parallel_model_and_bad_ones_are_named(converted, rank_pools):
    _, llm_cfg, tp, pp = VARIANTS[converted["variant"]]
    results = rank_pools(tp * pp).run(
        load_in_memory_and_compare, str(converted["hf"]), str(converted["megatron"]), tp, pp
    )
    for result in results:
        assert result["mismatches"] == []  # reference: megatron's dist_checkpointing load
        assert result["staging_error"].startswith("rank 0 could not stage the weights: ")
        assert "nowhere" in result["staging_error"]
        if result["last"]:
            h = llm_cfg.hidden_size
            name = "'llm.decoder.final_layernorm.weight'"
            assert result["messages"] == {
                "missing": f"missing tensor {name} (the model needs shape ({h},))",
                "misshapen": f"tensor {name} has shape ({h - 1},), the model needs ({h},)",
            }
        else:
            assert result["messages"] == {"missing": None, "misshapen": None}


# ---- reading sources; errors before anything is written ---------------------------------------


def _tiny_source(folder: Path) -> HFSource:
    return write_hf_source(folder, "qwen2", LLMConfig.preset("tiny"))


def test_bad_source_tensors_are_named_before_the_output_is_touched(tmp_path):
    source = _tiny_source(tmp_path / "source")
    weights = source.llm / "model.safetensors"
    good = load_file(weights)
    name = "model.layers.1.mlp.up_proj.weight"
    save_file({k: v for k, v in good.items() if k != name}, weights)
    with pytest.raises(
        ConversionError, match=rf"missing tensor '{name}' \(expected shape \(128, 64\)\)"
    ):
        hf_to_megatron(source, tmp_path / "out")
    save_file({**good, name: good[name][:, :-1].contiguous()}, weights)
    with pytest.raises(
        ConversionError, match=rf"'{name}' has shape \(128, 63\), expected \(128, 64\)"
    ):
        hf_to_megatron(source, tmp_path / "out")
    assert not (tmp_path / "out").exists()

    weights.unlink()
    (source.llm / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(ConversionError, match=r"pytorch_model\.bin.*not read, save them as safe"):
        hf_to_megatron(source, tmp_path / "out")


def test_plain_folders_whole_siglip_fresh_projector_and_tokenizer_ids(tmp_path):
    from transformers import SiglipConfig, SiglipModel

    from megatron_longvila.convert import read_longvila_config
    from megatron_longvila.convert.hf_mapping import vision_config_to_hf
    from megatron_longvila.convert.hf_source import read_longvila_weights
    from megatron_longvila.data.tokenizer import load_tokenizer

    source = _tiny_source(tmp_path / "source")
    # A whole SiglipModel folder (text tower too): only its vision_model.* is taken.
    text = {"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2, "vocab_size": 99}
    whole = SiglipModel(
        SiglipConfig(text_config=text, vision_config=vision_config_to_hf(VISION).to_dict())
    )
    whole.vision_model.load_state_dict(
        {
            k.removeprefix("vision_model."): v
            for k, v in load_file(source.vision_tower / "model.safetensors").items()
        }
    )
    whole.save_pretrained(tmp_path / "siglip-whole")
    plain = HFSource.from_parts(
        source.llm, tmp_path / "siglip-whole", source.mm_projector, **SETTINGS
    )
    cfg = read_longvila_config(plain)
    assert cfg == read_longvila_config(source)
    ours, reference = read_longvila_weights(plain, cfg), read_longvila_weights(source, cfg)
    assert (
        all(torch.equal(ours[k], reference[k]) for k in reference)
        and ours.keys() == reference.keys()
    )

    # No projector: a fresh one from the seed, the same for the same seed.
    no_projector = HFSource.from_parts(source.llm, source.vision_tower, **SETTINGS)
    first, again, other = (
        read_longvila_weights(no_projector, cfg, projector_seed=s) for s in (7, 7, 8)
    )
    name = "mm_projector.fc1.weight"
    assert torch.equal(first[name], again[name]) and not torch.equal(first[name], other[name])

    # No ids given: <image>/<video> as the data pipeline's tokenizer registers them.
    tokenizer = load_tokenizer(source.llm)
    from_tokenizer = read_longvila_config(HFSource.from_parts(source.llm, source.vision_tower))
    assert (from_tokenizer.image_token_id, from_tokenizer.video_token_id) == (
        tokenizer.image_id,
        tokenizer.video_id,
    )


def _load_tool(name: str):
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "tools" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_export_bf16_in_shards_and_refusing_to_overwrite(llama_converted, tmp_path, capsys):
    converted = llama_converted
    cli = _load_tool("convert_checkpoint")
    out = tmp_path / "bf16"
    args = ["to-hf", str(converted["megatron"]), str(out), "--quiet", "--no-tokenizer"]
    shard_args = ["--dtype", "bfloat16", "--max-shard-gb", str(2000 / 1024**3)]
    assert cli.main(args + shard_args) == 0
    index = json.loads((out / "llm" / "model.safetensors.index.json").read_text())
    assert (
        len(set(index["weight_map"].values())) > 1
    )  # several files of ≤ 2000 bytes (or one tensor)
    exported, reference = read_safetensors(out / "llm"), read_safetensors(converted["hf"] / "llm")
    assert exported.keys() == reference.keys()
    assert all(torch.equal(exported[k], reference[k].bfloat16()) for k in reference)

    assert cli.main(args) == 2
    assert "exists and is not empty; pass --force" in capsys.readouterr().err
    elsewhere = tmp_path / "elsewhere"
    wrong_tokenizer = ["--tokenizer", str(tmp_path / "nowhere")]
    assert cli.main(["to-hf", str(converted["megatron"]), str(elsewhere), *wrong_tokenizer]) == 2
    assert "nowhere is not a tokenizer folder" in capsys.readouterr().err
    assert not elsewhere.exists()
    assert cli.main([*args, "--force"]) == 0
    assert read_safetensors(out / "llm")["model.norm.weight"].dtype == torch.float32


def test_cli_import_in_spawned_processes_equals_the_torchrun_path(llama_converted, tmp_path):
    """``to-megatron`` without a process group spawns tp gloo processes; its checkpoint holds the
    same tensors as the one written on the ranks of an existing group."""
    from megatron_longvila.checkpoint.tensors import read_model_tensors

    cli = _load_tool("convert_checkpoint")
    source = llama_converted["source"]
    args = ["to-megatron", str(tmp_path / "ckpt"), "--tp", "2", "--quiet"]
    args += ["--llm", str(source.llm), "--vision-tower", str(source.vision_tower)]
    args += ["--mm-projector", str(source.mm_projector), "--vocab-pad-multiple", "64"]
    args += ["--image-token-id", "248", "--video-token-id", "249"]
    assert cli.main(args) == 0
    spawned = read_model_tensors(tmp_path / "ckpt" / "iter_0000000")
    reference = read_model_tensors(llama_converted["megatron"] / "iter_0000000")
    assert spawned.keys() == reference.keys()
    assert all(torch.equal(spawned[k], reference[k]) for k in reference)
    assert not (tmp_path / "ckpt" / ".staging").exists()


TRAINER_CONFIG = {  # the trainer's train_state.json "config" record (its parts read here)
    "model": {"preset": "tiny", "overrides": {"llm": {"rope_theta": 5.0e5}}},
    "data": {"tokenizer_path": "tokenizer-folder", "num_frames": 16},
}


def save_prefixed_training_checkpoint(root: str) -> dict[str, torch.Tensor]:
    """Save as the trainer does (``CheckpointManager``, model and optimizer state, its config
    record) with the model's keys prefixed ``model.`` and the embedding split over the ranks
    like a TP shard; returns the full tensors by module name."""
    import torch.distributed as dist
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    from megatron_longvila.checkpoint.manager import CheckpointManager

    rank, world = dist.get_rank(), dist.get_world_size()
    gen = torch.Generator().manual_seed(5)
    full = {
        "llm.embedding.word_embeddings.weight": torch.randn(6, 4, generator=gen),
        "llm.decoder.layers.mlp.linear_fc1.weight": torch.randn(2, 8, 4, generator=gen),
        "vision_tower.embeddings.position_embedding.weight": torch.randn(3, 4, generator=gen),
        "mm_projector.fc1.weight": torch.randn(4, 4, generator=gen),
    }
    rows = 6 // world
    embedding = full["llm.embedding.word_embeddings.weight"][rank * rows : (rank + 1) * rows]
    model = {
        name: ShardedTensor.from_rank_offsets(f"model.{name}", t.clone(), replica_id=rank)
        for name, t in full.items()
        if name != "llm.embedding.word_embeddings.weight"
    }
    model["embedding"] = ShardedTensor.from_rank_offsets(
        "model.llm.embedding.word_embeddings.weight", embedding.clone(), (0, rank, world)
    )
    optimizer = {  # its keys embed the model's, as megatron's optimizer state does
        "exp_avg": ShardedTensor.from_rank_offsets(
            "optimizer.state.exp_avg.model.llm.embedding.word_embeddings.weight",
            torch.zeros_like(embedding),
            (0, rank, world),
        )
    }
    state = {"model": model, "optimizer": optimizer}
    CheckpointManager(root).save(5, state, {"config": TRAINER_CONFIG})
    return full


def test_training_save_with_prefixed_keys_and_the_trainers_config_is_read(ranks2, tmp_path):
    """A save folder as the trainer leaves it (``latest``, ``iter_*``, its ``config`` record,
    optimizer state next to the model) whose model keys carry a ``model.`` prefix: the model's
    tensors come back by module name, one per layer, and nothing of the optimizer."""
    from megatron_longvila.checkpoint.layout import resolve_checkpoint_dir
    from megatron_longvila.checkpoint.tensors import read_model_tensors
    from megatron_longvila.checkpoint.train_state import (
        architecture_from_train_state,
        frames_from_train_state,
        read_train_state,
        tokenizer_from_train_state,
    )

    saved = ranks2.run(save_prefixed_training_checkpoint, str(tmp_path / "save"))[0]
    directory = resolve_checkpoint_dir(tmp_path / "save")
    assert directory == tmp_path / "save" / "iter_0000005"
    tensors = read_model_tensors(directory)
    stacked = saved.pop("llm.decoder.layers.mlp.linear_fc1.weight")
    for layer in range(2):
        saved[f"llm.decoder.layers.{layer}.mlp.linear_fc1.weight"] = stacked[layer]
    assert sorted(tensors) == sorted(saved)
    assert all(torch.equal(tensors[name], saved[name]) for name in saved)

    state = read_train_state(directory)
    cfg = architecture_from_train_state(state)
    tiny = LongVILAConfig.preset("tiny")
    assert cfg.llm.rope_theta == 5.0e5 and cfg.llm.hidden_size == tiny.llm.hidden_size
    assert cfg.vision == tiny.vision
    assert tokenizer_from_train_state(state) == "tokenizer-folder"
    assert frames_from_train_state(state) == (16, None)

    (directory / ".metadata").rename(directory / "metadata.moved")
    with pytest.raises(CheckpointError, match=r"no \.metadata"):
        read_model_tensors(directory)
