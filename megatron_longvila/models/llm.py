"""A Qwen2/Llama-style decoder LLM on megatron-core, driven by explicit position ids.

Embedding (vocab-parallel) → megatron TransformerBlock (RMSNorm, GQA self-attention with RoPE,
SwiGLU MLP) → output layer (vocab-parallel, optionally tied to the embedding) → logits or
per-token losses (vocab-parallel cross entropy, over chunks of tokens: :mod:`.loss`). Parameter
names follow megatron-core's ``GPTModel`` (``embedding.word_embeddings``,
``decoder.layers.N...``, ``output_layer``).

Pipeline parallel like ``GPTModel``: ``pre_process`` stages own the embedding, ``post_process``
stages the final norm and output layer, the decoder layers are split over the stages; the
schedule hands intermediate stages their input through :meth:`set_input_tensor`.

The attention kernel is the layer spec's ``core_attention`` (megatron's DotProductAttention by
default; MM-SP attention is passed the same way). RoPE angles are computed per token from
``position_ids`` (see :mod:`megatron_longvila.models.rotary`).

Megatron's TP sequence parallelism (``config.sequence_parallel``, on when tp > 1): the decoder
input is split along the sequence over the tensor-parallel ranks here, and the output layer
gathers it back, so callers see full-length embeddings, logits and losses either way.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.models.common.embeddings.language_model_embedding import (
    LanguageModelEmbedding,
)
from megatron.core.models.common.language_module.language_module import LanguageModule
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
)
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import ModelType
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlock
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_longvila.core.parallel_state import group_rank, group_size
from megatron_longvila.models.config import LLMConfig, MemoryConfig
from megatron_longvila.models.loss import chunked_vocab_parallel_cross_entropy
from megatron_longvila.models.offload import offload_saved_tensors
from megatron_longvila.models.rotary import rope_inverse_frequencies, rotary_angles
from megatron_longvila.models.transformer import (
    build_transformer_config,
    default_process_groups,
    recompute_mlp_activations,
    transformer_block_spec,
)


def llm_transformer_config(
    cfg: LLMConfig,
    pg_collection: ProcessGroupCollection,
    params_dtype: torch.dtype,
    overrides: dict[str, Any] | None = None,
    memory: MemoryConfig | None = None,
) -> TransformerConfig:
    return build_transformer_config(
        pg_collection,
        params_dtype,
        pipeline_parallel=True,
        architecture=dict(
            num_layers=cfg.num_layers,
            hidden_size=cfg.hidden_size,
            num_attention_heads=cfg.num_heads,
            num_query_groups=cfg.num_kv_heads,
            kv_channels=cfg.kv_channels,
            ffn_hidden_size=cfg.ffn_hidden_size,
            normalization="RMSNorm",
            layernorm_epsilon=cfg.rms_norm_eps,
            add_bias_linear=False,
            add_qkv_bias=cfg.qkv_bias,
            gated_linear_unit=True,
            activation_func=F.silu,
        ),
        overrides=overrides,
        memory=memory,
    )


def causal_segment_mask(segment_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
    """Attention mask for packed rows: a token sees the tokens of its own segment whose position
    is not after its own.

    Causality follows the position ids, not the order in the row, so the mask stays right for
    rows whose tokens were reordered (e.g. a zigzag shard) as long as positions travel with them.

    segment_ids:  [b, s] (equal ids = same sample).
    position_ids: [b, s] positions within each sample.
    Returns       [b, 1, s, s] bool, True where attention is *blocked* (megatron's convention).
    """
    if segment_ids.shape != position_ids.shape or segment_ids.dim() != 2:
        raise ValueError(
            f"segment_ids {tuple(segment_ids.shape)} and position_ids "
            f"{tuple(position_ids.shape)} must be equal [b, s] shapes"
        )
    same_segment = segment_ids.unsqueeze(2) == segment_ids.unsqueeze(1)  # [b, query, key]
    not_after = position_ids.unsqueeze(1) <= position_ids.unsqueeze(2)
    return ~(same_segment & not_after).unsqueeze(1)


class LanguageModel(LanguageModule):
    """The LLM. See the module docstring; :meth:`forward` for inputs and outputs."""

    def __init__(
        self,
        cfg: LLMConfig,
        *,
        core_attention: ModuleSpec | type = DotProductAttention,
        pre_process: bool = True,
        post_process: bool = True,
        params_dtype: torch.dtype = torch.float32,
        pg_collection: ProcessGroupCollection | None = None,
        transformer_overrides: dict[str, Any] | None = None,
        vp_stage: int | None = None,
        memory: MemoryConfig | None = None,
    ) -> None:
        pg_collection = pg_collection or default_process_groups()
        tp_size = group_size(pg_collection.tp)
        if cfg.padded_vocab_size % tp_size:
            raise ValueError(
                f"padded vocabulary {cfg.padded_vocab_size} (vocab_size {cfg.vocab_size} rounded "
                f"up to vocab_pad_multiple {cfg.vocab_pad_multiple}) does not split over "
                f"tensor-parallel size {tp_size}"
            )
        memory = memory or MemoryConfig()
        config = llm_transformer_config(
            cfg, pg_collection, params_dtype, transformer_overrides, memory
        )
        super().__init__(config=config, pg_collection=pg_collection)
        self.cfg = cfg
        self.memory = memory
        self.pre_process = pre_process
        self.post_process = post_process
        self.vp_stage = vp_stage
        self.share_embeddings_and_output_weights = cfg.tie_word_embeddings
        self.model_type = ModelType.encoder_or_decoder  # read by megatron's pipeline schedules

        if pre_process:
            self.embedding = LanguageModelEmbedding(
                config=config,
                vocab_size=cfg.padded_vocab_size,
                max_sequence_length=cfg.max_position_embeddings,
                position_embedding_type="none",  # positions enter through RoPE only
                # embed() returns the whole sequence; hidden_states() splits it for TP-SP.
                scatter_to_sequence_parallel=False,
                tp_group=pg_collection.tp,
            )
        self.register_buffer(
            "inv_freq",
            rope_inverse_frequencies(cfg.kv_channels, cfg.rope_theta, cfg.rope_scaling),
            persistent=False,
        )
        self.decoder = TransformerBlock(
            config=config,
            spec=transformer_block_spec(
                config,
                core_attention=core_attention,
                vp_stage=vp_stage,
                pp_rank=group_rank(pg_collection.pp),
            ),
            pre_process=pre_process,
            post_process=post_process,
            pg_collection=pg_collection,
            vp_stage=vp_stage,
        )
        if memory.recompute_activation:
            recompute_mlp_activations(self.decoder)
        offloaded = [
            layer for layer in self.decoder.layers if layer.layer_number <= memory.offload_layers
        ]
        offload_saved_tensors(offloaded)
        if post_process:
            self.output_layer = tensor_parallel.ColumnParallelLinear(
                config.hidden_size,
                cfg.padded_vocab_size,
                config=config,
                init_method=config.init_method,
                bias=False,
                gather_output=False,
                skip_weight_param_allocation=pre_process and cfg.tie_word_embeddings,
                tp_group=pg_collection.tp,
            )
            vocab_per_rank = cfg.padded_vocab_size // tp_size
            self.vocab_start = vocab_per_rank * group_rank(pg_collection.tp)
            token_ids = torch.arange(self.vocab_start, self.vocab_start + vocab_per_rank)
            self.register_buffer("vocab_padding", token_ids >= cfg.vocab_size, persistent=False)
        if pre_process or post_process:
            self.setup_embeddings_and_output_layer()

    def set_input_tensor(self, input_tensor: torch.Tensor | list[torch.Tensor] | None) -> None:
        """Input of a non-first pipeline stage (called by megatron's schedules)."""
        if isinstance(input_tensor, list):
            if len(input_tensor) != 1:
                raise ValueError(f"expected one input tensor, got {len(input_tensor)}")
            input_tensor = input_tensor[0]
        self.decoder.set_input_tensor(input_tensor)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings: input_ids [b, s] → [s, b, hidden] (first stage only)."""
        return self.embedding(input_ids=input_ids, position_ids=None)

    def forward(
        self,
        input_ids: torch.Tensor | None,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        decoder_input: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        packed_seq_params: PackedSeqParams | None = None,
    ) -> torch.Tensor:
        """Run this stage of the LLM.

        input_ids:     [b, s] token ids, embedded here when ``decoder_input`` is None (first
                       stage; later stages take their input from :meth:`set_input_tensor`).
        position_ids:  [b, s] position of every token (needed on every stage, for RoPE).
        attention_mask: optional [b, 1, s, s] bool, True = blocked (see
                       :func:`causal_segment_mask`); None = causal over the whole row.
        decoder_input: [s, b, hidden] input embeddings (e.g. text with visual tokens spliced
                       in), instead of ``input_ids``.
        labels:        [b, s] next-token targets; negative = no loss.
        packed_seq_params: passed to ``core_attention`` unchanged.

        Returns, on the last stage: logits [b, s, vocab_size] (gathered over tensor-parallel
        ranks, padding rows dropped) without labels, else per-token losses [b, s] fp32 (0 where
        the label is negative). Earlier stages return hidden states [s, b, hidden].
        """
        hidden = self.hidden_states(
            input_ids, position_ids, attention_mask, decoder_input, packed_seq_params
        )
        if not self.post_process:
            return hidden
        if labels is None:
            return self.logits(hidden)
        return self.token_losses(hidden, labels)

    def hidden_states(
        self,
        input_ids: torch.Tensor | None,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        decoder_input: torch.Tensor | None = None,
        packed_seq_params: PackedSeqParams | None = None,
    ) -> torch.Tensor:
        """The decoder layers of this stage (arguments as :meth:`forward`): [s, b, hidden]
        ([s/tp, b, hidden], this rank's part, under TP sequence parallelism), after the final
        norm on the last stage, ready for :meth:`logits`."""
        if decoder_input is None and self.pre_process:
            if input_ids is None:
                raise ValueError("the first stage needs input_ids or decoder_input")
            decoder_input = self.embed(input_ids)
        if decoder_input is not None and self.config.sequence_parallel:
            decoder_input = self._split_sequence(decoder_input)
        rotary = rotary_angles(position_ids, self.inv_freq)
        return self.decoder(
            hidden_states=decoder_input,
            attention_mask=attention_mask,
            rotary_pos_emb=rotary,
            packed_seq_params=packed_seq_params,
        )

    def _split_sequence(self, hidden: torch.Tensor) -> torch.Tensor:
        """[s, b, h] → this tensor-parallel rank's [s/tp, b, h] (gradients gathered back)."""
        tp = self.config.tensor_model_parallel_size
        if hidden.shape[0] % tp:
            raise ValueError(
                f"TP sequence parallelism splits the {hidden.shape[0]} tokens of this rank's "
                f"sequence over tp={tp} ranks: pad the sequence to a multiple of tp (or build "
                "with sequence_parallel=False)"
            )
        part = tensor_parallel.scatter_to_sequence_parallel_region(hidden, group=self.tp_group)
        # The split is a view: without a copy the first norm would keep the whole sequence alive
        # (megatron's embedding clones its scatter output for the same reason).
        return part.clone()

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Last stage: hidden [s, b, hidden] from :meth:`hidden_states` → logits
        [b, s, vocab_size], gathered over tensor-parallel ranks, padding rows dropped."""
        logits = tensor_parallel.gather_from_tensor_model_parallel_region(
            self._vocab_parallel_logits(hidden), group=self.tp_group
        )
        return logits[..., : self.cfg.vocab_size].transpose(0, 1).contiguous()

    def token_losses(self, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Last stage: per-token cross entropy [b, s] fp32 of hidden [s, b, hidden] against
        labels [b, s] (0 where the label is negative), in chunks of
        ``memory.loss_chunk_tokens`` tokens (see :mod:`megatron_longvila.models.loss`)."""
        chunk = self.memory.loss_chunk_tokens
        if chunk is None:
            losses = self.compute_language_model_loss(labels, self._vocab_parallel_logits(hidden))
            return losses.masked_fill(labels < 0, 0.0)
        # The input of the output layer, as its tensor-parallel region would see it.
        if self.config.sequence_parallel:
            hidden = gather_from_sequence_parallel_region(
                hidden, tensor_parallel_output_grad=True, group=self.tp_group
            )
        else:
            hidden = copy_to_tensor_model_parallel_region(hidden, group=self.tp_group)
        s, b, width = hidden.shape
        tied = self.cfg.tie_word_embeddings
        weight = self.shared_embedding_or_output_weight() if tied else self.output_layer.weight
        losses = chunked_vocab_parallel_cross_entropy(
            hidden.reshape(s * b, width),
            weight,
            labels.t().reshape(s * b),
            vocab_start=self.vocab_start,
            vocab_size=self.cfg.vocab_size,
            chunk_tokens=chunk,
            tp_group=self.tp_group if group_size(self.tp_group) > 1 else None,
            accumulate_into_main_grad=not tied,
        )
        return losses.view(s, b).t().contiguous()

    def _vocab_parallel_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[s, b, padded_vocab / tp]: this rank's vocabulary slice, padding rows at -inf."""
        weight = self.shared_embedding_or_output_weight() if self.cfg.tie_word_embeddings else None
        logits, _ = self.output_layer(hidden, weight=weight)
        # Padding rows are not tokens: they take no probability mass.
        return logits.masked_fill(self.vocab_padding, float("-inf"))
