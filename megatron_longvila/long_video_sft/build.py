"""Raw videos -> long-video instruction shards: annotate every video (in parallel, resumable),
then write the finished ones as webdataset shards in the project's sample format.

Per video (``annotate.VideoAnnotator``): clips, clip captions, summary, QA pairs; the result is
stored in the work folder (``result_cache``). A restarted build skips videos whose result is
stored for the same file and settings; a video that fails (unreadable, or an error in a model) is
listed in the report with the reason and retried by the next build, never stopping this one.

Parallelism: ``workers`` processes, each loading the models once and annotating one video at a
time; ``workers=0`` annotates in this process. A worker process that dies (e.g. out of memory)
breaks its pool: the videos then in flight (at most two per worker) are reported as failed and
the build goes on in new processes.

Output: ``out_dir`` holds the shards of every finished video (``shard_writer.write_webdataset``;
Energon-ready, loadable by ``build_train_loader``). A sample is the video plus ``.json`` with
``conversations`` (the QA turns) and the metadata ``clips`` (frame and second boundaries and the
caption of each clip), ``summary``, ``clip_method``, ``qa_error``, ``fps``, ``num_frames`` and
``source`` (the video's path under the video root). The work folder also gets ``samples.jsonl``
(the records the shards were written from) and ``report.json``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import multiprocessing
import os
import sys
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from megatron_longvila.core.process_lifetime import exit_with_parent
from megatron_longvila.data.sample_format import VIDEO_EXTENSIONS
from megatron_longvila.data.shard_writer import WriteReport, write_webdataset
from megatron_longvila.data.video import VideoDecodeError
from megatron_longvila.long_video_sft.annotate import (
    AnnotationConfig,
    AnnotationError,
    VideoAnnotator,
)
from megatron_longvila.long_video_sft.captioners import load_captioner, parse_captioner_spec
from megatron_longvila.long_video_sft.prompts import PromptTemplates, load_templates
from megatron_longvila.long_video_sft.result_cache import (
    ResultCache,
    fingerprint,
    video_key,
)
from megatron_longvila.long_video_sft.text_generators import HFTextGenerator

logger = logging.getLogger(__name__)

#: Result fields copied into each sample's ``.json`` as metadata.
SAMPLE_METADATA = ("clips", "summary", "clip_method", "qa_error", "fps", "num_frames")


@dataclass
class BuildConfig:
    #: "hf:FOLDER" (a Hugging Face vision-language model), "py:MODULE:FACTORY" (a plug-in) or
    #: "longvila:CHECKPOINT" (see ``captioners``).
    captioner: str | None = None
    #: Hugging Face causal LM folder for the summary and the QA pairs.
    text_model: str | None = None
    #: Folder whose caption.txt / summary.txt / qa.txt replace the shipped templates.
    templates_dir: str | None = None
    annotation: AnnotationConfig = field(default_factory=AnnotationConfig)
    device: str = "cpu"
    #: Model dtype name ("bfloat16", ...); None keeps each folder's.
    dtype: str | None = None
    #: Worker processes annotating videos in parallel (0: in this process).
    workers: int = 0
    #: torch threads of each worker process.
    threads_per_worker: int = 1
    max_shard_bytes: int = 1 << 30
    progress: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.annotation, dict):
            self.annotation = AnnotationConfig(**self.annotation)
        if self.captioner is not None:
            parse_captioner_spec(self.captioner)  # fail here, not in every worker
        if self.workers < 0 or self.threads_per_worker < 1:
            raise ValueError(
                f"need workers >= 0 and threads_per_worker >= 1, got workers={self.workers}, "
                f"threads_per_worker={self.threads_per_worker}"
            )

    def results_fingerprint(self, templates: PromptTemplates) -> str:
        """What a stored result must have been made with to count as finished."""
        return fingerprint(
            {
                "captioner": self.captioner,
                "text_model": self.text_model,
                "annotation": dataclasses.asdict(self.annotation),
                "templates": dataclasses.asdict(templates),
            }
        )


@dataclass
class Failure:
    video: str
    reason: str


@dataclass
class BuildReport:
    videos: int = 0
    #: Annotated by this build.
    annotated: list[str] = field(default_factory=list)
    #: Finished by an earlier build and skipped.
    cached: list[str] = field(default_factory=list)
    failed: list[Failure] = field(default_factory=list)
    #: Finished videos whose QA output did not parse (their sample uses the summary).
    qa_fallbacks: list[Failure] = field(default_factory=list)
    write: WriteReport | None = None

    def to_json(self) -> dict:
        write = self.write
        return {
            "videos": self.videos,
            "annotated": self.annotated,
            "cached": self.cached,
            "failed": [dataclasses.asdict(f) for f in self.failed],
            "qa_fallbacks": [dataclasses.asdict(f) for f in self.qa_fallbacks],
            "samples": write.samples if write else 0,
            "shards": write.shards if write else [],
            "shard_writer_skipped": [dataclasses.asdict(s) for s in write.skipped] if write else [],
        }


@dataclass(frozen=True)
class VideoJob:
    video_root: Path
    relative: str
    work_dir: Path
    settings_fingerprint: str


@dataclass(frozen=True)
class Outcome:
    relative: str
    #: "done", "failed", or "no_models" (the worker could not load its models).
    status: str
    reason: str = ""


def find_videos(video_root: Path) -> list[str]:
    """Paths (relative, POSIX) of the video files under ``video_root``, sorted."""
    return sorted(
        p.relative_to(video_root).as_posix()
        for p in video_root.rglob("*")
        if p.is_file() and p.suffix.lstrip(".").lower() in VIDEO_EXTENSIONS
    )


def build_annotator(config: BuildConfig, templates: PromptTemplates) -> VideoAnnotator:
    """Load the configured captioner and text model."""
    if config.captioner is None or config.text_model is None:
        raise ValueError(
            f"need a captioner and a text model, got captioner={config.captioner!r}, "
            f"text_model={config.text_model!r}"
        )
    captioner = load_captioner(config.captioner, config.device, config.dtype)
    text_generator = HFTextGenerator(config.text_model, config.device, config.dtype)
    return VideoAnnotator(captioner, text_generator, templates, config.annotation)


def annotate_and_store(annotator: VideoAnnotator, job: VideoJob) -> Outcome:
    """Annotate one video and store its result; any failure becomes a failed Outcome."""
    path = job.video_root / job.relative
    try:
        data = path.read_bytes()
        result = annotator.annotate(data)
    except (OSError, VideoDecodeError, AnnotationError) as exc:
        return Outcome(job.relative, "failed", f"{type(exc).__name__}: {exc}")
    except Exception as exc:  # a model or library error on this video: report it, go on
        logger.exception("annotating %s failed", job.relative)
        return Outcome(job.relative, "failed", f"{type(exc).__name__}: {exc}")
    ResultCache(job.work_dir).save(job.relative, len(data), job.settings_fingerprint, result)
    return Outcome(job.relative, "done")


# ---- worker processes -------------------------------------------------------------------------

_worker_state: dict = {}


def _init_worker(config: BuildConfig, templates: PromptTemplates, parent_pid: int) -> None:
    # A builder killed mid-run must not leave workers annotating (and writing) on their own.
    exit_with_parent(parent_pid)
    import torch

    torch.set_num_threads(config.threads_per_worker)
    try:
        _worker_state["annotator"] = build_annotator(config, templates)
    except Exception as exc:  # reported with the first job, which stops the build
        _worker_state["error"] = f"{type(exc).__name__}: {exc}"


def _run_in_worker(job: VideoJob) -> Outcome:
    if "error" in _worker_state:
        return Outcome(job.relative, "no_models", _worker_state["error"])
    return annotate_and_store(_worker_state["annotator"], job)


def run_in_processes(
    jobs: list[VideoJob],
    config: BuildConfig,
    templates: PromptTemplates,
    on_outcome: Callable[[Outcome], None],
) -> None:
    """Annotate ``jobs`` in ``config.workers`` processes, at most two jobs per worker in flight;
    a pool broken by a dying worker fails the jobs in flight and is replaced."""
    pending = list(reversed(jobs))
    context = multiprocessing.get_context("spawn")  # fork would copy torch's thread pools
    while pending:
        with ProcessPoolExecutor(
            config.workers,
            context,
            initializer=_init_worker,
            initargs=(config, templates, os.getpid()),
        ) as pool:
            in_flight: dict[Future, VideoJob] = {}
            broken = False
            while (pending and not broken) or in_flight:
                while pending and not broken and len(in_flight) < 2 * config.workers:
                    job = pending.pop()
                    in_flight[pool.submit(_run_in_worker, job)] = job
                done, _ = wait(in_flight, return_when=FIRST_COMPLETED)
                for future in done:
                    job = in_flight.pop(future)
                    try:
                        on_outcome(future.result())
                    except BrokenProcessPool:
                        broken = True
                        on_outcome(Outcome(job.relative, "failed", "a worker process died with it"))


# ---- the build --------------------------------------------------------------------------------


def _sample_record(result: dict) -> dict:
    record = {
        "id": video_key(result["video"]),
        "video": result["video"],
        "conversations": result["conversations"],
        "source": result["video"],
    }
    record.update({k: result[k] for k in SAMPLE_METADATA})
    return record


def _checked_videos(video_root: Path, videos: Iterable[str]) -> list[str]:
    checked = []
    for relative in videos:
        path = (video_root / relative).resolve()
        if video_root not in path.parents:
            raise ValueError(f"video {relative!r} lies outside the video root {video_root}")
        checked.append(path.relative_to(video_root).as_posix())
    return sorted(set(checked))


def build_long_video_sft(
    video_root: str | Path,
    out_dir: str | Path,
    work_dir: str | Path,
    config: BuildConfig,
    videos: Iterable[str] | None = None,
    annotator: VideoAnnotator | None = None,
) -> BuildReport:
    """Annotate the videos under ``video_root`` (or the listed ``videos``, paths relative to it)
    and write the shards to ``out_dir``; see the module docstring.

    ``annotator``: models already loaded in this process (then ``config.workers`` must be 0);
    by default they are loaded from ``config``. Either way the results are stored under the
    fingerprint of ``config``, whose model names should say which models made them.
    """
    video_root, out_dir, work_dir = Path(video_root).resolve(), Path(out_dir), Path(work_dir)
    if annotator is not None and config.workers:
        raise ValueError(f"a prebuilt annotator runs in this process; got workers={config.workers}")
    listed = _checked_videos(video_root, videos) if videos is not None else find_videos(video_root)
    if not listed:
        raise ValueError(f"no video ({', '.join(VIDEO_EXTENSIONS)}) found under {video_root}")
    templates = load_templates(config.templates_dir)
    settings = config.results_fingerprint(templates)
    cache = ResultCache(work_dir)
    report = BuildReport(videos=len(listed))
    jobs = []
    for relative in listed:
        path = video_root / relative
        size = path.stat().st_size if path.is_file() else -1
        if cache.finished(relative, size, settings) is not None:
            report.cached.append(relative)
        else:
            jobs.append(VideoJob(video_root, relative, work_dir, settings))

    progress = tqdm(
        total=len(jobs),
        unit="video",
        desc="annotating",
        disable=not config.progress,
        file=sys.stderr,
    )

    def on_outcome(outcome: Outcome) -> None:
        if outcome.status == "no_models":
            raise RuntimeError(f"the worker processes could not load the models: {outcome.reason}")
        if outcome.status == "done":
            report.annotated.append(outcome.relative)
        else:
            report.failed.append(Failure(outcome.relative, outcome.reason))
            logger.warning("skipping video %s: %s", outcome.relative, outcome.reason)
        progress.update(1)
        progress.set_postfix(failed=len(report.failed))

    with progress:
        if config.workers == 0 and jobs:
            annotator = annotator or build_annotator(config, templates)
            for job in jobs:
                on_outcome(annotate_and_store(annotator, job))
        elif jobs:
            run_in_processes(jobs, config, templates, on_outcome)

    report.annotated.sort()
    report.failed.sort(key=lambda f: f.video)
    finished = set(report.annotated) | set(report.cached)
    records = []
    for relative in listed:
        result = cache.load(relative) if relative in finished else None
        if result is None:
            continue
        records.append(_sample_record(result))
        if result["qa_error"]:
            report.qa_fallbacks.append(Failure(relative, result["qa_error"]))
    work_dir.mkdir(parents=True, exist_ok=True)
    jsonl = work_dir / "samples.jsonl"
    jsonl.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    try:
        if not records:
            raise ValueError(f"none of the {len(listed)} videos could be annotated")
        report.write = write_webdataset(
            jsonl,
            out_dir,
            media_root=video_root,
            max_shard_bytes=config.max_shard_bytes,
            overwrite=True,
        )
    finally:
        (work_dir / "report.json").write_text(json.dumps(report.to_json(), indent=1))
    return report
