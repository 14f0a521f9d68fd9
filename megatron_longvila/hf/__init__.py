"""MM-SP for plain transformers models (Llama/Qwen2 families): one call to enable it.

``enable_mmsp()`` registers the attention implementation ``"mmsp"`` with transformers and returns
the :class:`MMSPSharding` that splits inputs and computes the loss::

    sharding = enable_mmsp()                                  # after initialize_mmsp(...)
    model = Qwen2ForCausalLM.from_pretrained(path, attn_implementation="mmsp")
    batch = sharding.shard_batch(input_ids, labels, position_ids)
    loss = sharding.causal_lm_loss(model(**batch.model_inputs()).logits, batch)
    loss.backward()
    sharding.sum_gradients(model)
"""

from __future__ import annotations

from megatron_longvila.core.parallel_state import MMSPGroups, get_mmsp_groups
from megatron_longvila.hf.attention import register_mmsp_attention
from megatron_longvila.hf.sharding import IGNORE_INDEX, MMSPSharding, ShardedBatch

__all__ = ["IGNORE_INDEX", "MMSPSharding", "ShardedBatch", "enable_mmsp"]


def enable_mmsp(
    groups: MMSPGroups | None = None, layout: str = "zigzag", name: str = "mmsp"
) -> MMSPSharding:
    """Make ``attn_implementation=name`` run MM-SP attention over ``groups``.

    groups: default those of ``initialize_mmsp`` (``get_mmsp_groups()``; groups of one when MM-SP
    is not initialized). layout: "zigzag" (balanced causal work) or "contiguous". Set the model's
    ``config._attn_implementation = name`` (or ``from_pretrained(..., attn_implementation=name)``)
    and feed it the shards that the returned :class:`MMSPSharding` makes.
    """
    groups = get_mmsp_groups() if groups is None else groups
    register_mmsp_attention(name, groups, layout)
    return MMSPSharding(groups=groups, layout=layout, attn_implementation=name)
