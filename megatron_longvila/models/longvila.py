"""The LongVILA vision-language model with two-stage MM-SP sharding.

Submodules (their names are the prefixes of checkpoint keys): ``vision_tower``
(:class:`VisionTower`) and ``mm_projector`` (:class:`MLPDownsampleProjector`) on the first
pipeline stage only, ``llm`` (:class:`LanguageModel`, attention = :class:`MMSPAttention`) on every
stage with its decoder layers split over the stages (megatron-core numbering).

A forward pass on one rank, given its :class:`MMSPInputs` (see :mod:`.multimodal_inputs`):

* stage 1 (first pipeline stage): the vision tower and projector encode only this rank's share
  of the frames; :func:`deliver_visual_tokens` sends each visual token to the rank whose zigzag
  shard holds its position (one all-to-all with per-rank counts; gradients return the same way);
* stage 2: the text embeddings of the local shard get the delivered visual tokens spliced in at
  their slots, and the LLM runs on the shard with MM-SP attention (packed samples as segment ids,
  RoPE from each token's own position id). Batches without packed rows attend causally without
  segment ids, which keeps the kernels on their unmasked (flash) path.

sp is megatron-core's context-parallel group (``[ulysses, ring]`` its hierarchical levels); tensor
parallel ranks of one sp rank encode the same frames with the TP-aware vision tower. The LLM's
``TransformerConfig`` (``model.config``) has ``context_parallel_size = sp`` and
``calculate_per_token_loss = True``: megatron's DDP sums gradients over dp × sp and its
``finalize_model_grads`` divides them by the global count of valid tokens.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.enums import ModelType
from megatron.core.transformer.module import MegatronModule

from megatron_longvila.core.parallel_state import MMSPGroups, MMSPTopology, group_size
from megatron_longvila.core.sequence_parallel.attention import MMSPAttention, MMSPPackedSeqParams
from megatron_longvila.core.sequence_parallel.visual_exchange import deliver_visual_tokens
from megatron_longvila.data.batch import MultimodalBatch
from megatron_longvila.models.config import LongVILAConfig
from megatron_longvila.models.llm import LanguageModel
from megatron_longvila.models.multimodal_inputs import MMSPInputs, prepare_mmsp_inputs
from megatron_longvila.models.projector import MLPDownsampleProjector
from megatron_longvila.models.transformer import default_process_groups
from megatron_longvila.models.vision import VisionTower


def _check_topology(cfg: LongVILAConfig, pg_collection: ProcessGroupCollection) -> MMSPGroups:
    """The MM-SP groups of ``pg_collection``, refused (naming the sizes) if the LLM cannot run."""
    groups = MMSPGroups.from_pg_collection(pg_collection)
    topology = MMSPTopology(
        tp=group_size(pg_collection.tp),
        ulysses=groups.ulysses_size,
        ring=groups.ring_size,
        pp=group_size(pg_collection.pp),
    )
    world = dist.get_world_size() if dist.is_initialized() else topology.model_parallel_size
    topology.validate(world, cfg.llm.num_heads, cfg.llm.num_kv_heads)
    return groups


class LongVILAModel(MegatronModule):
    """Vision tower + projector + LLM for one pipeline stage (see the module docstring).

    ``transformer_overrides`` are megatron ``TransformerConfig`` fields applied to the vision
    tower and the LLM (e.g. ``recompute_granularity``, ``init_method_std``).
    """

    def __init__(
        self,
        cfg: LongVILAConfig,
        *,
        pre_process: bool = True,
        post_process: bool = True,
        params_dtype: torch.dtype = torch.float32,
        pg_collection: ProcessGroupCollection | None = None,
        transformer_overrides: dict[str, Any] | None = None,
    ) -> None:
        pg_collection = pg_collection or default_process_groups()
        groups = _check_topology(cfg, pg_collection)
        overrides = dict(transformer_overrides or {})
        pipelined = group_size(pg_collection.pp) > 1
        llm = LanguageModel(
            cfg.llm,
            core_attention=MMSPAttention,
            memory=cfg.memory,
            pre_process=pre_process,
            post_process=post_process,
            params_dtype=params_dtype,
            pg_collection=pg_collection,
            transformer_overrides={
                **overrides,
                "context_parallel_size": groups.sp_size,
                "calculate_per_token_loss": True,
                # The padded length changes with the frames of each batch: stages exchange shapes.
                "variable_seq_lengths": pipelined,
                # megatron refuses variable lengths with its default MoE dispatcher ("allgather"),
                # even for a dense model like this one.
                **({"moe_token_dispatcher_type": "alltoall"} if pipelined else {}),
            },
        )
        super().__init__(config=llm.config)
        self.cfg = cfg
        self.tp_group = pg_collection.tp  # read by MegatronModule.sharded_state_dict
        self.groups = groups
        self.pre_process = pre_process
        self.post_process = post_process
        self.model_type = ModelType.encoder_or_decoder  # read by megatron's pipeline schedules
        # Read by finalize_model_grads, which syncs tied embeddings of the first and last stage.
        self.share_embeddings_and_output_weights = cfg.llm.tie_word_embeddings
        if pre_process:
            self.vision_tower = VisionTower(
                cfg.vision,
                params_dtype=params_dtype,
                pg_collection=pg_collection,
                transformer_overrides=overrides,
                memory=cfg.memory,
            )
            self.mm_projector = MLPDownsampleProjector(
                cfg.projector,
                cfg.vision.hidden_size,
                cfg.llm.hidden_size,
                params_dtype=params_dtype,
            )
        self.llm = llm
        #: Frames this rank's vision tower encoded since the last :meth:`take_frames_encoded`
        #: (its stage-1 share; the trainer logs it per step).
        self.frames_encoded = 0

    def take_frames_encoded(self) -> int:
        """The frames encoded since the last call; the counter starts again at zero."""
        count, self.frames_encoded = self.frames_encoded, 0
        return count

    def prepare_inputs(self, batch: MultimodalBatch) -> MMSPInputs:
        """This rank's inputs for ``batch`` (the same batch on every rank of the sp group); its
        frames are normalized on this model's device."""
        return prepare_mmsp_inputs(
            batch,
            self.cfg,
            sp=self.groups.sp_size,
            sp_rank=self.groups.sp_rank,
            with_frames=self.pre_process,
            tp_sequence_split=self.config.tensor_model_parallel_size
            if self.config.sequence_parallel
            else 1,
            device=next(self.parameters()).device,
        )

    def set_input_tensor(self, input_tensor: torch.Tensor | list[torch.Tensor] | None) -> None:
        """Input of a non-first pipeline stage (called by megatron's schedules)."""
        self.llm.set_input_tensor(input_tensor)

    def shared_embedding_or_output_weight(self) -> torch.Tensor:
        return self.llm.shared_embedding_or_output_weight()

    def encode_frames(self, frames: torch.Tensor | None) -> torch.Tensor:
        """Stage 1 on this rank's frames: [n, C, H, W] → visual tokens [n · T, llm_hidden]."""
        hidden = self.cfg.llm.hidden_size
        if frames is None or frames.shape[0] == 0:
            weight = self.mm_projector.fc2.weight
            return weight.new_zeros(0, hidden)
        self.frames_encoded += int(frames.shape[0])
        tokens = self.mm_projector(self.vision_tower(frames))  # [n, T, hidden]
        return tokens.reshape(-1, hidden)

    def embed(self, inputs: MMSPInputs) -> torch.Tensor:
        """Decoder input of this rank's shard: text embeddings with the visual tokens spliced
        in at their positions, [s/sp, b, hidden]."""
        text = self.llm.embed(inputs.input_ids)  # [s/sp, b, hidden]
        visual = deliver_visual_tokens(
            self.encode_frames(inputs.frames), inputs.route, self.groups.sp
        )
        s, b, hidden = text.shape
        flat = text.reshape(s * b, hidden).index_put((inputs.route.recv_slots,), visual)
        return flat.reshape(s, b, hidden)

    def forward(self, inputs: MMSPInputs, return_logits: bool = False) -> torch.Tensor:
        """Run this pipeline stage on this rank's shard.

        Returns, on the last stage: per-token losses [b, s/sp] fp32 (0 where the label is
        IGNORE_INDEX), or logits [b, s/sp, vocab] with ``return_logits``; on earlier stages the
        hidden states [s/sp, b, hidden] for the next stage.
        """
        decoder_input = self.embed(inputs) if self.pre_process else None
        packed = None  # rows of one sample need no mask: the kernels' causal path is exact
        if inputs.packed:
            packed = MMSPPackedSeqParams.from_segment_ids(inputs.segment_ids, inputs.seq_length)
        return self.llm(
            None,
            inputs.position_ids,
            decoder_input=decoder_input,
            labels=None if return_logits else inputs.labels,
            packed_seq_params=packed,
        )
