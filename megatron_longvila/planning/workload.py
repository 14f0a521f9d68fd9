"""What is benchmarked: a Llama-like GPT decoder shape and the parallel strategies compared.

A strategy puts ``tp × ulysses × ring`` ranks on one sequence, and runs ``dp`` such groups
side by side (data parallelism) in each of ``pp`` pipeline stages:
``world = tp·ulysses·ring·dp·pp``.
Ranks are ordered tp innermost, then Ulysses, ring, dp, pp (see ``core/topology.py``).

* ``2D`` — MM-SP: Ulysses (``ulysses`` ranks) inside, zigzag ring (``ring`` ranks) across, with
  optional megatron-core tensor parallelism inside the Ulysses group;
* ``ring-only`` — zigzag ring attention over all ranks of the sequence (ulysses = 1, tp = 1);
* ``ulysses-only`` — one Ulysses group of all ranks of the sequence (ring = 1, tp = 1);
* ``CP+TP`` — Megatron's recipe: megatron-core tensor parallelism (``tp`` ranks split heads and
  weights) and a p2p K/V ring over the context-parallel ranks (``ring``), as Transformer Engine's
  ``cp_comm_type="p2p"`` does;
* ``hier-CP`` — Megatron's hierarchical context parallelism (TE ``cp_comm_type="a2a+p2p"``):
  tensor parallelism, an all-to-all level (``ulysses``) and a p2p ring (``ring``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class GPTShape:
    """A Llama-like decoder: RMSNorm, GQA, RoPE, SwiGLU MLP, no biases, untied embeddings."""

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    ffn_hidden: int
    vocab: int

    def __post_init__(self) -> None:
        if self.hidden % self.heads:
            raise ValueError(f"hidden {self.hidden} is not divisible by heads {self.heads}")
        if self.heads % self.kv_heads:
            raise ValueError(f"heads {self.heads} are not a multiple of kv_heads {self.kv_heads}")

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


# Llama-3-8B's decoder (the LLM of LongVILA-8B's first release).
LLAMA3_8B = GPTShape(layers=32, hidden=4096, heads=32, kv_heads=8, ffn_hidden=14336, vocab=128256)


# Qwen2-7B's decoder (LongVILA-7B's LLM; its QKV biases are left out of the count).
QWEN2_7B = GPTShape(layers=28, hidden=3584, heads=28, kv_heads=4, ffn_hidden=18944, vocab=152064)


# Small enough for 8 gloo ranks on a few CPU cores; Ulysses up to 8 (kv heads replicated).
CPU_SMALL = GPTShape(layers=2, hidden=256, heads=8, kv_heads=4, ffn_hidden=704, vocab=1024)


@dataclass(frozen=True)
class Strategy:
    """How ``tp × ulysses × ring`` ranks share one sequence; see the module docstring."""

    kind: str
    tp: int = 1
    ulysses: int = 1
    ring: int = 1
    dp: int = 1
    pp: int = 1

    KINDS = ("2D", "ring-only", "ulysses-only", "CP+TP", "hier-CP")

    def __post_init__(self) -> None:
        if self.kind not in self.KINDS:
            raise ValueError(f"unknown strategy kind {self.kind!r}; expected one of {self.KINDS}")
        sizes = {"tp": self.tp, "ulysses": self.ulysses, "ring": self.ring, "dp": self.dp}
        bad = {k: v for k, v in (sizes | {"pp": self.pp}).items() if v < 1}
        if bad:
            raise ValueError(f"{self.kind}: sizes must be >= 1, got {bad}")
        if self.kind in ("ring-only", "ulysses-only") and self.tp != 1:
            raise ValueError(f"{self.kind} runs without tensor parallelism, got tp={self.tp}")
        if self.kind == "CP+TP" and self.ulysses != 1:
            raise ValueError(f"CP+TP has no Ulysses level, got ulysses={self.ulysses}")
        if self.kind == "ring-only" and self.ulysses != 1:
            raise ValueError(f"ring-only has ulysses=1, got {self.ulysses}")
        if self.kind == "ulysses-only" and self.ring != 1:
            raise ValueError(f"ulysses-only has ring=1, got {self.ring}")

    @property
    def world(self) -> int:
        return self.tp * self.ulysses * self.ring * self.dp * self.pp

    @property
    def grad_group(self) -> int:
        """Ranks one parameter's gradient is reduced over (megatron-core's dp × cp)."""
        return self.dp * self.sp

    @property
    def sp(self) -> int:
        """Ranks the sequence is split over (megatron-core's context-parallel size)."""
        return self.ulysses * self.ring

    @property
    def label(self) -> str:
        if self.kind == "CP+TP":
            text = f"CP+TP tp{self.tp}×cp{self.ring}"
        elif self.kind in ("2D", "hier-CP"):
            tp = f"tp{self.tp}×" if self.tp > 1 else ""
            text = f"{self.kind} {tp}{self.ulysses}×{self.ring}"
        else:
            text = f"{self.kind} {self.sp}"
        return text + "".join(f" {k}{v}" for k, v in (("dp", self.dp), ("pp", self.pp)) if v > 1)

    def check(self, shape: GPTShape) -> None:
        """Raise ``ValueError`` naming the numbers if this strategy cannot split ``shape``."""
        split = self.tp * self.ulysses
        if shape.heads % split:
            raise ValueError(
                f"{self.label}: {shape.heads} heads are not divisible by tp×ulysses = {split}"
            )
        if shape.kv_heads % self.tp:
            raise ValueError(f"{self.label}: {shape.kv_heads} kv heads not divisible by tp")
        kv = shape.kv_heads // self.tp
        if kv % self.ulysses and self.ulysses % kv:
            raise ValueError(
                f"{self.label}: {kv} kv heads per tp rank can neither be split over nor "
                f"replicated onto ulysses={self.ulysses}"
            )
        if shape.vocab % self.tp:
            raise ValueError(f"{self.label}: vocab {shape.vocab} not divisible by tp={self.tp}")


def strategies_for(world: int, shape: GPTShape, inner: int | None = None) -> list[Strategy]:
    """The strategies compared on ``world`` ranks, those that cannot split ``shape`` left out.

    ``inner`` (the ranks of one node): the 2D split ``inner × world/inner`` and CP+TP with
    ``tp = inner`` (none when ``inner`` does not properly divide ``world``); ``None``: every 2D
    split and every CP+TP with ``1 < tp < world``.
    """
    divisors = [d for d in range(2, world) if world % d == 0]
    inners = [d for d in divisors if d == inner] if inner is not None else divisors
    candidates = [Strategy("ring-only", ring=world), Strategy("ulysses-only", ulysses=world)]
    candidates += [Strategy("2D", ulysses=u, ring=world // u) for u in inners]
    candidates += [Strategy("CP+TP", tp=t, ring=world // t) for t in inners]
    feasible = []
    for strategy in candidates:
        try:
            strategy.check(shape)
        except ValueError:
            continue
        feasible.append(strategy)
    return feasible
