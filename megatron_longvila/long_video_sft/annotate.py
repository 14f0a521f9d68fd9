"""One video -> clips, clip captions, a summary and question-answer pairs (a JSON-ready dict).

Steps: probe the video and decode its first and last frame (the check the shard writer makes),
find its clips (``clips.find_clips``), decode ``frames_per_clip`` frames spread over each clip
(seeking), caption each clip, summarise the captions, ask for question-answer pairs about the
whole video and parse them (``qa_format``). The conversation is the QA pairs as turns, the
first question carrying the ``<video>`` placeholder. When no pair parses, the failure and the
raw output are recorded and the conversation falls back to one turn: ``fallback_question``
answered by the summary.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from megatron_longvila.data.tokenizer import VIDEO_TOKEN
from megatron_longvila.data.video import (
    VideoInfo,
    check_video_readable,
    decode_frames,
    uniform_frame_indices,
)
from megatron_longvila.long_video_sft.captioners import Captioner
from megatron_longvila.long_video_sft.clips import Clip, ClipConfig, find_clips
from megatron_longvila.long_video_sft.prompts import PromptTemplates
from megatron_longvila.long_video_sft.qa_format import format_captions, parse_qa_pairs
from megatron_longvila.long_video_sft.text_generators import TextGenerator


class AnnotationError(ValueError):
    """A video that yields no usable sample (nothing readable, or no text at all)."""


@dataclass
class AnnotationConfig:
    clips: ClipConfig = field(default_factory=ClipConfig)
    #: Frames shown to the captioner per clip, spread uniformly over the clip.
    frames_per_clip: int = 8
    #: Frames are scaled (keeping their aspect) so the longer side is at most this (None: as
    #: decoded); the captioner's processor resizes them again.
    caption_max_side: int | None = 448
    num_questions: int = 5
    caption_tokens: int = 128
    summary_tokens: int = 512
    qa_tokens: int = 768
    fallback_question: str = "Describe the video in detail."

    def __post_init__(self) -> None:
        if isinstance(self.clips, dict):
            self.clips = ClipConfig(**self.clips)
        counts = {
            "frames_per_clip": self.frames_per_clip,
            "num_questions": self.num_questions,
            "caption_tokens": self.caption_tokens,
            "summary_tokens": self.summary_tokens,
            "qa_tokens": self.qa_tokens,
        }
        bad = [f"{k}={v}" for k, v in counts.items() if v < 1]
        if self.caption_max_side is not None and self.caption_max_side < 16:
            bad.append(f"caption_max_side={self.caption_max_side}")
        if bad:
            raise ValueError(
                f"invalid AnnotationConfig: {', '.join(bad)} (need >= 1, caption_max_side >= 16)"
            )


def caption_frame_size(info: VideoInfo, max_side: int | None) -> tuple[int, int] | None:
    """(w, h) for decoding frames to show the captioner (even sizes), None for native."""
    if max_side is None or max(info.width, info.height) <= max_side:
        return None
    scale = max_side / max(info.width, info.height)
    return max(2, round(info.width * scale / 2) * 2), max(2, round(info.height * scale / 2) * 2)


def clip_frame_indices(clip: Clip, frames_per_clip: int) -> list[int]:
    return [clip.start + i for i in uniform_frame_indices(clip.end - clip.start, frames_per_clip)]


def conversation_from_qa(pairs: list[tuple[str, str]]) -> list[dict]:
    turns = []
    for i, (question, answer) in enumerate(pairs):
        prefix = VIDEO_TOKEN + "\n" if i == 0 else ""
        turns += [{"from": "human", "value": prefix + question}, {"from": "gpt", "value": answer}]
    return turns


class VideoAnnotator:
    """Runs the steps of the module docstring with one captioner and one text generator."""

    def __init__(
        self,
        captioner: Captioner,
        text_generator: TextGenerator,
        templates: PromptTemplates,
        config: AnnotationConfig,
    ) -> None:
        self.captioner = captioner
        self.text_generator = text_generator
        self.templates = templates
        self.config = config

    def caption_clips(self, data: bytes, info: VideoInfo, clips: list[Clip]) -> list[str]:
        per_clip = [clip_frame_indices(clip, self.config.frames_per_clip) for clip in clips]
        size = caption_frame_size(info, self.config.caption_max_side)
        frames = decode_frames(data, [i for indices in per_clip for i in indices], size)
        captions, offset = [], 0
        for index, (clip, indices) in enumerate(zip(clips, per_clip)):
            start, end = clip.seconds(info.fps)
            prompt = self.templates.render(
                "caption",
                start=start,
                end=end,
                duration=info.duration_s,
                index=index,
                num_clips=len(clips),
            )
            clip_frames = frames[offset : offset + len(indices)]
            offset += len(indices)
            captions.append(self.captioner.caption(clip_frames, prompt, self.config.caption_tokens))
        return captions

    def annotate(self, data: bytes) -> dict:
        """The annotation of one video's bytes; see the module docstring for the fields'
        meaning. Raises ``VideoDecodeError`` for unreadable videos and :class:`AnnotationError`
        when no text came out."""
        cfg = self.config
        info = check_video_readable(data)
        plan = find_clips(data, info, cfg.clips)
        captions = self.caption_clips(data, info, plan.clips)
        spans = [clip.seconds(info.fps) for clip in plan.clips]
        listed = format_captions(spans, captions)
        common = {"duration": info.duration_s, "num_clips": len(plan.clips)}
        summary = self.text_generator.generate(
            self.templates.render("summary", captions=listed, **common), cfg.summary_tokens
        )
        qa_raw = self.text_generator.generate(
            self.templates.render(
                "qa", summary=summary, captions=listed, num_questions=cfg.num_questions, **common
            ),
            cfg.qa_tokens,
        )
        pairs = parse_qa_pairs(qa_raw, limit=cfg.num_questions)
        qa_error = None
        if not pairs:
            qa_error = "no 'Q: ... / A: ...' pair in the text model's output"
            if not summary:
                raise AnnotationError(f"{qa_error}, and the summary is empty")
            pairs_for_turns = [(cfg.fallback_question, summary)]
        else:
            pairs_for_turns = pairs
        return {
            "num_frames": info.num_frames,
            "fps": info.fps,
            "width": info.width,
            "height": info.height,
            "clip_method": plan.method,
            "scene_cuts": plan.cuts,
            "clips": [
                {
                    "start_frame": clip.start,
                    "end_frame": clip.end,
                    "start_s": round(start, 3),
                    "end_s": round(end, 3),
                    "caption": caption,
                }
                for clip, (start, end), caption in zip(plan.clips, spans, captions)
            ],
            "summary": summary,
            "qa": [{"question": q, "answer": a} for q, a in pairs],
            "qa_error": qa_error,
            "qa_raw": qa_raw if qa_error else None,
            "conversations": conversation_from_qa(pairs_for_turns),
        }
