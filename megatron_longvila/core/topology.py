"""The MM-SP topology ``tp × sp × dp × pp`` with ``sp = ulysses × ring``: sizes and their checks.

The one place that decides whether a layout can run a model on a world. Torch-free, so every
entry point (the trainer's config check, the launcher's dry run, inference, the planner) calls it
before any process group starts; :func:`~megatron_longvila.core.parallel_state.initialize_mmsp`
builds the groups from it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MMSPTopology:
    """Sizes of the parallel dimensions; ``dp`` follows from the world size."""

    tp: int = 1
    ulysses: int = 1
    ring: int = 1
    pp: int = 1

    def __post_init__(self) -> None:
        for name in ("tp", "ulysses", "ring", "pp"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"MMSPTopology.{name} must be a positive integer, got {value!r}")

    @property
    def sp(self) -> int:
        return self.ulysses * self.ring

    @property
    def model_parallel_size(self) -> int:
        """Ranks per data-parallel replica: ``tp × sp × pp``."""
        return self.tp * self.sp * self.pp

    def sequence_multiple(self, sequence_parallel: bool) -> int:
        """What every padded sequence length must be a multiple of (see
        :func:`sequence_multiple`); ``sequence_parallel``: Megatron's TP sequence parallelism."""
        return sequence_multiple(self.sp, self.tp if sequence_parallel else 1)

    def dp(self, world_size: int) -> int:
        self.validate(world_size)
        return world_size // self.model_parallel_size

    def layout(self, world_size: int) -> dict[str, int]:
        """Every size of the layout on ``world_size`` ranks, dp included."""
        return {
            "tp": self.tp,
            "ulysses": self.ulysses,
            "ring": self.ring,
            "pp": self.pp,
            "sp": self.sp,
            "dp": self.dp(world_size),
        }

    def validate(
        self,
        world_size: int | None = None,
        num_attention_heads: int | None = None,
        num_query_groups: int | None = None,
        seq_length: int | None = None,
        num_layers: int | None = None,
        vision_num_heads: int | None = None,
    ) -> None:
        """Raise ``ValueError`` naming the numbers if this topology cannot run the model/world.

        ``num_attention_heads`` / ``num_query_groups`` / ``num_layers``: the LLM's (heads split
        over tp × ulysses, key/value heads over tp then split or replicated over ulysses, layers
        over pp); ``vision_num_heads``: the vision tower's (split over tp; the tower runs without
        sequence parallelism); ``seq_length``: the longest row, which every sp rank needs two
        zigzag chunks of.
        """
        n = self.model_parallel_size
        if world_size is not None and world_size % n:
            raise ValueError(
                f"world size {world_size} is not divisible by tp×ulysses×ring×pp = "
                f"{self.tp}×{self.ulysses}×{self.ring}×{self.pp} = {n}"
            )
        if num_attention_heads is not None:
            split = self.tp * self.ulysses
            if num_attention_heads % split:
                raise ValueError(
                    f"num_attention_heads {num_attention_heads}: the attention heads are not "
                    f"divisible by tp×ulysses = {self.tp}×{self.ulysses} = {split}"
                )
        if num_query_groups is not None:
            self._validate_kv_heads(num_query_groups)
        if num_layers is not None and num_layers % self.pp:
            raise ValueError(f"num_layers {num_layers} is not divisible by pp {self.pp}")
        if vision_num_heads is not None and vision_num_heads % self.tp:
            raise ValueError(
                f"the vision tower's {vision_num_heads} attention heads are not divisible by "
                f"tp {self.tp}"
            )
        if seq_length is not None and seq_length < 2 * self.sp:
            raise ValueError(
                f"sequence length {seq_length} is shorter than 2×sp = 2×{self.sp} = "
                f"{2 * self.sp}: every sp rank needs two zigzag chunks"
            )

    def _validate_kv_heads(self, num_query_groups: int) -> None:
        if num_query_groups % self.tp:
            raise ValueError(
                f"num_query_groups {num_query_groups} (key/value heads) is not divisible by "
                f"tp {self.tp}"
            )
        per_tp = num_query_groups // self.tp
        try:
            replicated_kv_heads(per_tp, self.ulysses)
        except ValueError:
            raise ValueError(
                f"{per_tp} key/value heads per tensor-parallel rank (num_query_groups "
                f"{num_query_groups} / tp {self.tp}) can neither be split over ulysses="
                f"{self.ulysses} ranks nor replicated onto them: one must divide the other"
            ) from None


def sequence_multiple(sp: int, tp_sequence_split: int = 1) -> int:
    """``2·sp·tp_sequence_split``: every sp rank holds two zigzag chunks of a padded sequence,
    and under Megatron's TP sequence parallelism each shard is split again over the
    ``tp_sequence_split`` tensor-parallel ranks (1 without)."""
    for name, value in (("sp", sp), ("tp_sequence_split", tp_sequence_split)):
        if value < 1:
            raise ValueError(f"{name} must be at least 1, got {value}")
    return 2 * sp * tp_sequence_split


def replicated_kv_heads(kv_heads: int, ulysses: int) -> int:
    """Key/value heads per tensor-parallel rank after replication for Ulysses.

    ``kv_heads`` divisible by ``ulysses``: unchanged. Fewer kv heads than ``ulysses`` (and
    ``ulysses`` a multiple of them): each is repeated so every Ulysses rank gets one.
    """
    if kv_heads % ulysses == 0:
        return kv_heads
    if ulysses % kv_heads == 0:
        return ulysses
    raise ValueError(
        f"{kv_heads} key/value heads per tensor-parallel rank can neither be split over nor "
        f"replicated onto ulysses={ulysses} ranks (one must divide the other)"
    )
