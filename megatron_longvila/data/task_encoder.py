"""The LongVILA task encoder on Megatron-Energon: shard sample -> MultimodalSample -> batch.

Stages (Energon calls them in this order; each may skip a sample, see ``sample_issues.ISSUES``):

1. cook (:meth:`LongVILATaskEncoder.cook`): raw tar parts -> :class:`RawConversation`
   (parsed ``.json`` conversation or ``.txt`` caption, media parts in order).
2. pre-encode: chat template -> token ids and labels; videos probed and their frame indices
   chosen; the expanded length ``tokens - placeholders + frames × tokens_per_frame`` checked
   against ``max_seq_length``. Cheap: no frame is decoded, so packing buffers stay small.
3. packing (optional): first-fit decreasing over a buffer of pre-encoded samples.
4. post-encode: frames decoded by seeking, scaled (and cropped) as uint8 -> MultimodalSample
   (the model pads and normalizes them on its device).
5. batch: rows (one sample, or one pack) padded into a MultimodalBatch.

The layout of a sample in a shard is described in ``sample_format``.
"""

from __future__ import annotations

import torch
from megatron.energon import DefaultTaskEncoder, Sample, SkipSample, edataclass, stateless
from megatron.energon.task_encoder.cooking import Cooker, basic_sample_keys

from megatron_longvila.data.batch import MultimodalBatch, MultimodalSample
from megatron_longvila.data.chat_template import (
    ConversationError,
    get_template,
    normalize_conversation,
    tokenize_conversation,
)
from megatron_longvila.data.config import DataConfig
from megatron_longvila.data.packing import collate_rows, pack_first_fit
from megatron_longvila.data.sample_format import (
    ordered_media_parts,
    placeholder_sequence,
    sample_conversation,
    with_placeholders,
)
from megatron_longvila.data.sample_issues import SampleIssues
from megatron_longvila.data.shard_dataset import READ_ERROR_FIELD
from megatron_longvila.data.tokenizer import TextTokenizer
from megatron_longvila.data.video import (
    VideoDecodeError,
    decode_frames,
    frames_to_sample,
    probe_video,
    uniform_frame_indices,
)
from megatron_longvila.data.vision_transform import (
    ImageDecodeError,
    decode_image,
    fit_frames,
    scaled_size,
)


@edataclass
class MediaPart:
    kind: str  # "image" | "video"
    ext: str
    data: bytes
    #: Videos: frames to decode and the native size (set in pre-encoding).
    frame_indices: list | None = None
    size: tuple | None = None


@edataclass
class RawConversation(Sample):
    """A shard sample after cooking: the conversation turns and media parts in order."""

    turns: list
    media: list  # [MediaPart]


@edataclass
class PlannedSample(Sample):
    """Tokenized, with frame indices chosen, not yet decoded."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    media: list  # [MediaPart]
    expanded_length: int


class LongVILATaskEncoder(DefaultTaskEncoder):
    """See the module docstring. ``issues`` collects what was skipped or adapted."""

    # Raw bytes: the cooker parses JSON and the encoder decodes media itself, so every failure
    # is attributed to its sample and counted.
    decoder = None

    def __init__(self, config: DataConfig, tokenizer: TextTokenizer, issues: SampleIssues):
        super().__init__()
        self.config = config
        self.tokenizer = tokenizer
        self.template = get_template(config.chat_template)
        self.issues = issues
        self.cookers = [Cooker(self.cook)]

    # ---- 1. cook -----------------------------------------------------------------------------
    @stateless
    def cook(self, raw: dict) -> RawConversation:
        key = str(raw.get("__key__", "?"))
        if READ_ERROR_FIELD in raw:
            self.issues.skip("tar_read_error", key, raw[READ_ERROR_FIELD])
        try:
            turns = sample_conversation(raw, self.config.caption_prompt)
            normalize_conversation(turns)
        except ConversationError as exc:
            self.issues.skip("bad_json", key, str(exc))
        except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
            self.issues.skip("bad_json", key, f"not JSON: {exc}")
        media = [MediaPart(kind=k, ext=e, data=d) for k, e, d in ordered_media_parts(raw)]
        return RawConversation(**basic_sample_keys(raw), turns=turns, media=media)

    # ---- 2. pre-encode -----------------------------------------------------------------------
    @stateless
    def preencode_sample(self, sample: RawConversation) -> PlannedSample:
        key, media, turns = sample.__key__, sample.media, sample.turns
        placeholders = placeholder_sequence(turns)
        if not placeholders and media:
            try:
                turns = with_placeholders(turns, [m.kind for m in media])
            except ConversationError as exc:
                self.issues.skip("bad_json", key, str(exc))
            placeholders = [m.kind for m in media]
        if placeholders != [m.kind for m in media]:
            self.issues.skip(
                "media_mismatch",
                key,
                f"text placeholders {placeholders} vs media parts {[m.kind for m in media]}",
            )
        try:
            input_ids, labels = tokenize_conversation(
                turns, self.tokenizer, self.template, self.config.system_prompt
            )
        except ConversationError as exc:
            self.issues.skip("bad_json", key, str(exc))
        frames = 0
        planned = []
        for item in media:
            if item.kind == "image":
                planned.append(item)
                frames += 1
                continue
            try:
                info = probe_video(item.data)
            except VideoDecodeError as exc:
                self.issues.skip("corrupt_video", key, str(exc))
            wanted = frames_to_sample(
                info, self.config.num_frames, self.config.fps, self.config.max_frames
            )
            indices = uniform_frame_indices(info.num_frames, wanted)
            if len(indices) < wanted:
                self.issues.record(
                    "short_video", key, f"{info.num_frames} frames, {wanted} asked; using all"
                )
            planned.append(
                MediaPart(
                    kind="video",
                    ext=item.ext,
                    data=item.data,
                    frame_indices=indices,
                    size=(info.width, info.height),
                )
            )
            frames += len(indices)
        expanded = int(input_ids.numel()) - len(media) + frames * self.config.tokens_per_frame
        if expanded > self.config.max_seq_length:
            self.issues.skip(
                "too_long",
                key,
                f"{expanded} tokens ({input_ids.numel()} text, {frames} frames × "
                f"{self.config.tokens_per_frame}) > max_seq_length {self.config.max_seq_length}",
            )
        return PlannedSample.derive_from(
            sample,
            input_ids=input_ids,
            labels=labels,
            media=planned,
            expanded_length=expanded,
        )

    # ---- 3. packing --------------------------------------------------------------------------
    def select_samples_to_pack(self, samples: list[PlannedSample]) -> list[list[PlannedSample]]:
        groups = pack_first_fit([s.expanded_length for s in samples], self.config.max_seq_length)
        return [[samples[i] for i in group] for group in groups]

    @stateless
    def pack_selected_samples(self, samples: list[MultimodalSample]) -> list[MultimodalSample]:
        if not samples:
            raise SkipSample("every sample of the pack was skipped")
        return list(samples)

    # ---- 4. post-encode ----------------------------------------------------------------------
    @stateless
    def postencode_sample(self, sample: PlannedSample) -> MultimodalSample:
        cfg = self.config
        tensors = []
        for item in sample.media:
            if item.kind == "video":
                out_size = scaled_size(*item.size, cfg.image_size, cfg.resize_mode)
                try:
                    frames = decode_frames(item.data, item.frame_indices, out_size)
                except VideoDecodeError as exc:
                    self.issues.skip("corrupt_video", sample.__key__, str(exc))
            else:
                try:
                    frames = [decode_image(item.data, cfg.image_size, cfg.resize_mode)]
                except ImageDecodeError as exc:
                    self.issues.skip("corrupt_image", sample.__key__, str(exc))
            tensors.append(fit_frames(frames, cfg.image_size, cfg.resize_mode))
        self.issues.delivered()
        return MultimodalSample(
            key=sample.__key__,
            input_ids=sample.input_ids,
            labels=sample.labels,
            media=tensors,
            media_kinds=[item.kind for item in sample.media],
        )

    # ---- 5. batch ----------------------------------------------------------------------------
    @stateless
    def batch(self, rows: list) -> MultimodalBatch:
        rows = [row if isinstance(row, list) else [row] for row in rows]
        return collate_rows(rows, self.tokenizer.pad_id)
