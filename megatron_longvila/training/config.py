"""The trainer's config: one YAML per stage (see ``examples/configs/``), overridable from the CLI.

Sections: ``run`` (where, how long, how often to log and save), ``init`` (what the stage starts
from), ``parallel`` (tp × ulysses × ring × pp; dp follows from the world size; ``parallel: auto``
lets the launcher plan it for the allocation, see :mod:`.auto_layout`), ``model`` (an
architecture preset, overrides, which modules are frozen), ``data`` (the data pipeline's
:class:`~megatron_longvila.data.config.DataConfig`), ``optimizer`` (AdamW, warm-up + cosine,
clipping). Everything is checked by :func:`load_train_config` before any process group starts:
unknown keys, wrong types, values out of range, sizes that do not divide (by the topology's one
validator), paths that do not exist or hold no dataset / checkpoint, and a resume onto another
world or dp size.

``data.image_size`` and ``tokens_per_frame`` follow from the model and are filled in when the
YAML leaves them out; a YAML value that disagrees is an error.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import yaml

from megatron_longvila.checkpoint.layout import (
    TRAIN_STATE,
    CheckpointError,
    latest_dir,
    resolve_checkpoint_dir,
)
from megatron_longvila.core.topology import MMSPTopology
from megatron_longvila.data.config import ENERGON_DATASET_FILE, DataConfig
from megatron_longvila.models.config import MODULES, TOKEN_ORDERS, LongVILAConfig
from megatron_longvila.models.config import ConfigError as ModelConfigError
from megatron_longvila.training.config_io import ConfigError, apply_overrides, from_dict


@dataclass
class RunConfig:
    output_dir: str
    train_steps: int
    name: str = "longvila"
    seed: int = 1234
    #: Micro-batches accumulated per optimizer step (each one a MultimodalBatch of the loader).
    micro_batches_per_step: int = 1
    log_interval: int = 1
    save_interval: int = 100
    keep_last: int = 2
    tensorboard: bool = True
    wandb: bool = False
    #: "auto": bf16 on GPUs, fp32 on CPU.
    precision: Literal["auto", "fp32", "bf16"] = "auto"

    def __post_init__(self) -> None:
        for name in ("train_steps", "micro_batches_per_step", "log_interval", "save_interval"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.keep_last < 1:
            raise ValueError(f"keep_last must be >= 1, got {self.keep_last}")


@dataclass
class InitConfig:
    """What a fresh run starts from (a run with its own checkpoints resumes from those)."""

    #: Checkpoint root or iteration folder of the previous stage (model weights only).
    checkpoint: str | None = None
    #: A LongVILA Hugging Face folder (llm/, vision_tower/, mm_projector/, config.json).
    hf: str | None = None
    #: Order of the merged visual tokens of ``hf``'s projector, when the folder cannot tell it.
    token_order: str | None = None

    def __post_init__(self) -> None:
        if self.checkpoint and self.hf:
            raise ValueError("give either checkpoint or hf, not both")
        if self.token_order is not None and self.token_order not in TOKEN_ORDERS:
            raise ValueError(f"token_order must be one of {TOKEN_ORDERS}, got {self.token_order!r}")
        if self.token_order is not None and not self.hf:
            raise ValueError("token_order is for a Hugging Face folder (init.hf)")


@dataclass
class ParallelConfig:
    tp: int = 1
    ulysses: int = 1
    ring: int = 1
    pp: int = 1
    use_distributed_optimizer: bool = False
    #: Full activation recomputation of every transformer layer (MM-SP aims to need none).
    recompute: bool = False

    def __post_init__(self) -> None:
        self.topology()  # sizes must be positive integers

    def topology(self) -> MMSPTopology:
        return MMSPTopology(tp=self.tp, ulysses=self.ulysses, ring=self.ring, pp=self.pp)

    @property
    def sp(self) -> int:
        return self.ulysses * self.ring


@dataclass
class ModelSection:
    preset: str = "tiny"
    #: Nested overrides of the preset, e.g. ``{llm: {rope_theta: 1.0e6}}``.
    overrides: dict[str, Any] = field(default_factory=dict)
    #: Modules whose parameters do not train: any of vision_tower, mm_projector, llm.
    freeze: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        unknown = sorted(set(self.freeze) - set(MODULES))
        if unknown:
            raise ValueError(f"freeze names unknown module(s) {unknown}; modules: {list(MODULES)}")
        if set(self.freeze) == set(MODULES):
            raise ValueError("every module is frozen: nothing would train")

    def build(self) -> LongVILAConfig:
        """The architecture: the preset with ``overrides`` merged in."""
        return LongVILAConfig.from_preset(self.preset, self.overrides)


@dataclass
class OptimizerSection:
    lr: float = 1e-4
    min_lr: float = 0.0
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    warmup_steps: int = 0
    clip_grad: float = 1.0

    def __post_init__(self) -> None:
        if self.lr <= 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise ValueError(
                f"need 0 <= min_lr <= lr and lr > 0, got lr={self.lr}, min_lr={self.min_lr}"
            )
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.adam_eps <= 0:
            raise ValueError(f"adam_eps must be > 0, got {self.adam_eps}")
        if self.clip_grad < 0:
            raise ValueError(f"clip_grad must be >= 0 (0: no clipping), got {self.clip_grad}")


@dataclass
class TrainConfig:
    run: RunConfig
    data: DataConfig
    init: InitConfig = field(default_factory=InitConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    model: ModelSection = field(default_factory=ModelSection)
    optimizer: OptimizerSection = field(default_factory=OptimizerSection)

    def __post_init__(self) -> None:
        if self.optimizer.warmup_steps >= self.run.train_steps:
            raise ValueError(
                f"optimizer.warmup_steps = {self.optimizer.warmup_steps} must be smaller than "
                f"run.train_steps = {self.run.train_steps}"
            )

    def architecture(self) -> LongVILAConfig:
        """The model's architecture; starting from ``init.hf``, its projector orders the merged
        tokens as the folder's did."""
        arch = self.model.build()
        if self.init.hf:
            order = hf_token_order(self.init)
            arch = replace(arch, projector=replace(arch.projector, token_order=order))
        return arch

    @property
    def checkpoint_dir(self) -> Path:
        return Path(self.run.output_dir) / "checkpoints"


AUTO_LAYOUT = "auto"


def explicit_layout_wins(tree: dict[str, Any], overrides: list[str]) -> None:
    """``parallel.*`` overrides replace ``parallel: auto`` (in place): an explicit layout wins."""
    if tree.get("parallel") == AUTO_LAYOUT and any(o.startswith("parallel.") for o in overrides):
        tree["parallel"] = {}


def _derived_data_fields(arch: LongVILAConfig) -> dict[str, Any]:
    return {
        "image_size": arch.vision.image_size,
        "tokens_per_frame": arch.tokens_per_frame,
    }


def load_train_config(
    path: str | Path | None, overrides: list[str] = (), world_size: int | None = None
) -> TrainConfig:
    """Read, override, fill in and check a training config (see module docstring).

    ``world_size`` (default: ``WORLD_SIZE`` from the launcher, else 1: the world of its own that
    ``platform.init_distributed`` makes without a launcher) is checked against the parallel
    sizes here, before any process group exists, and so is resuming the run's own checkpoints
    on that world (:func:`check_resume`).
    """
    tree: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        tree = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        if not isinstance(tree, dict):
            raise ConfigError(f"config file {path} must hold a mapping at the top level")
    explicit_layout_wins(tree, overrides)
    apply_overrides(tree, list(overrides))
    if tree.get("parallel") == AUTO_LAYOUT:
        raise ConfigError(
            "parallel: auto is planned by the launcher for its allocation (python -m "
            "megatron_longvila.training.launcher --config ... [--dry-run]), which hands the "
            "layout on as parallel={...}; give parallel.tp/ulysses/ring/pp to start without it"
        )

    model = from_dict(ModelSection, tree.get("model") or {}, "model")
    try:
        arch = model.build()
    except ModelConfigError as exc:
        raise ConfigError(f"model: {exc}") from None
    data = tree.setdefault("data", {})
    if not isinstance(data, dict):
        raise ConfigError("data must be a mapping")
    for key, value in _derived_data_fields(arch).items():
        if key not in data:
            data[key] = value
        elif _as_list(data[key]) != _as_list(value):
            raise ConfigError(
                f"data.{key} = {data[key]!r} disagrees with the model ({value!r}); leave it out "
                "to take the model's value"
            )

    config = from_dict(TrainConfig, tree)
    check_paths(config)
    check_hf_init(config)
    # Without a launcher the trainer runs as a world of one (platform.init_distributed).
    world_size = world_size or int(os.environ.get("WORLD_SIZE", "0")) or 1
    check_world(config, arch, world_size)
    check_resume(config, world_size)
    return config


def _as_list(value: Any) -> Any:
    return [float(v) for v in value] if isinstance(value, (list, tuple)) else value


def check_paths(config: TrainConfig) -> None:
    """Every input path exists and is what it claims: a prepared Energon dataset (its
    ``.nv-meta/dataset.yaml``) or a metadataset file, a checkpoint for ``init.checkpoint``."""
    for name in ("dataset_path", "tokenizer_path"):
        value = getattr(config.data, name)
        if not Path(value).exists():
            raise ConfigError(f"data.{name}: {value} does not exist")
    dataset = Path(config.data.dataset_path)
    if dataset.is_dir() and not (dataset / ENERGON_DATASET_FILE).is_file():
        raise ConfigError(
            f"data.dataset_path: {dataset} has no Energon metadata ({ENERGON_DATASET_FILE}): "
            "prepare the shards first (tools/make_webdataset.py prepares what it writes; "
            "`energon prepare` prepares other webdataset folders)"
        )
    for name in ("checkpoint", "hf"):
        value = getattr(config.init, name)
        if value and not Path(value).exists():
            raise ConfigError(f"init.{name}: {value} does not exist")
    if config.init.checkpoint:
        try:
            directory = resolve_checkpoint_dir(config.init.checkpoint)
        except CheckpointError as exc:
            raise ConfigError(f"init.checkpoint: {exc}") from None
        if not (directory / TRAIN_STATE).is_file():
            raise ConfigError(
                f"init.checkpoint: {directory} has no {TRAIN_STATE}: not a finished checkpoint "
                "of this trainer"
            )


def hf_token_order(init: InitConfig) -> str:
    """The token order of ``init.hf``'s projector (``init.token_order`` where it cannot tell)."""
    from megatron_longvila.convert.hf_source import HFSource, read_token_order

    return read_token_order(HFSource.from_folder(init.hf, token_order=init.token_order))


def check_hf_init(config: TrainConfig) -> None:
    """``init.hf`` is a LongVILA folder whose architecture and token order can be read, and the
    model's overrides do not ask for another token order."""
    if not config.init.hf:
        return
    from megatron_longvila.convert import HFSource, read_longvila_config

    try:
        source = HFSource.from_folder(config.init.hf, token_order=config.init.token_order)
        folder_order = read_longvila_config(source).projector.token_order
    except (OSError, ValueError) as exc:  # ConversionError included
        raise ConfigError(f"init.hf: {exc}") from None
    asked = (config.model.overrides.get("projector") or {}).get("token_order", folder_order)
    if asked != folder_order:
        raise ConfigError(
            f"model.overrides.projector.token_order = {asked!r}, but init.hf ({config.init.hf}) "
            f"was trained with {folder_order!r} (set init.token_order for a folder that cannot "
            "tell)"
        )


def check_world(config: TrainConfig, arch: LongVILAConfig, world_size: int) -> None:
    check_layout(config.parallel, arch, world_size, config.data.max_seq_length)


def check_resume(config: TrainConfig, world_size: int) -> None:
    """A run that resumes its own latest checkpoint must keep the world size and the dp size:
    the data position is saved per rank and per data-parallel replica (tp, sp and pp may change;
    the model and optimizer reshard). Refused here, before anything is loaded, naming both
    layouts; ``init.checkpoint`` starts a new run from those weights instead."""
    latest = latest_dir(config.checkpoint_dir)
    if latest is None:
        return
    try:
        state = json.loads((latest / TRAIN_STATE).read_text(encoding="utf-8"))
        saved_world = int(state["world_size"])
        saved = from_dict(ParallelConfig, state["config"]["parallel"], "parallel")
    except (OSError, ValueError, KeyError, TypeError, ConfigError) as exc:
        raise ConfigError(f"cannot resume {latest}: unreadable {TRAIN_STATE} ({exc})") from None
    saved_dp = saved_world // saved.topology().model_parallel_size
    dp = world_size // config.parallel.topology().model_parallel_size
    if (saved_world, saved_dp) != (world_size, dp):
        raise ConfigError(
            f"cannot resume {latest}: it was written by {saved_world} ranks with dp={saved_dp}, "
            f"this run has {world_size} ranks with dp={dp}. Resuming keeps the exact data "
            "position only with the same world size and dp size (tp, ulysses, ring and pp may "
            "change); to continue from these weights with another dp, start a new run "
            f"(another run.output_dir) with init.checkpoint={latest}"
        )


def check_layout(
    parallel: ParallelConfig, arch: LongVILAConfig, world_size: int, seq_length: int | None
) -> MMSPTopology:
    """The layout against the world, the model and the row length, by the one validator
    (:meth:`MMSPTopology.validate`); returns the topology."""
    topology = parallel.topology()
    try:
        topology.validate(
            world_size,
            num_attention_heads=arch.llm.num_heads,
            num_query_groups=arch.llm.num_kv_heads,
            seq_length=seq_length,
            num_layers=arch.llm.num_layers,
            vision_num_heads=arch.vision.num_heads,
        )
    except ValueError as exc:
        raise ConfigError(f"parallel: {exc}") from None
    return topology
