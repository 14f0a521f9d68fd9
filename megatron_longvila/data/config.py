"""Every knob of the video data pipeline, in one validated dataclass."""

from __future__ import annotations

from dataclasses import dataclass

RESIZE_MODES = ("pad", "crop")
#: What makes a folder a prepared Energon dataset (written by ``energon prepare`` and by
#: ``shard_index.prepare_energon_dataset``).
ENERGON_DATASET_FILE = ".nv-meta/dataset.yaml"
CHAT_TEMPLATES = ("qwen2", "llama3")


@dataclass
class DataConfig:
    """Where the data is, how frames are sampled and shaped, how text is tokenized and packed.

    The model side provides ``image_size`` and ``tokens_per_frame`` (how many LLM tokens the
    projector makes of one frame); the pipeline uses the latter to compute a sample's expanded
    length ``text tokens - placeholders + frames × tokens_per_frame`` for packing and for the
    maximum-length check. Frames leave the pipeline as uint8; the model normalizes them with its
    vision tower's mean and std.
    """

    #: Energon dataset folder (prepared webdataset shards with ``.nv-meta/``) or metadataset yaml.
    dataset_path: str
    #: Hugging Face tokenizer folder, or a sentencepiece ``.model`` file.
    tokenizer_path: str
    chat_template: str = "qwen2"
    #: System prompt; ``None`` takes the template's default (qwen2: "You are a helpful
    #: assistant.", llama3: none).
    system_prompt: str | None = None
    #: The user turn of a caption sample (``<key>.txt`` caption, no conversation): the caption
    #: is the answer. The media placeholders are prepended to it.
    caption_prompt: str = "Describe the video in detail."

    #: Frames sampled uniformly over the whole video when ``fps`` is None.
    num_frames: int = 8
    #: If set, sample at this rate instead, capped at ``max_frames``.
    fps: float | None = None
    max_frames: int = 1024

    image_size: int = 448
    #: "pad": fit inside the square and pad with the mean colour; "crop": fill it, centre crop.
    resize_mode: str = "pad"
    tokens_per_frame: int = 196

    max_seq_length: int = 4096
    micro_batch_size: int = 1
    #: Pack several samples into one row of at most ``max_seq_length`` expanded tokens.
    packing: bool = False
    #: How many samples the packer chooses from at a time.
    packing_buffer_size: int = 32
    #: Samples shuffled in a buffer on top of Energon's shard-slice shuffling (0: off). Not with
    #: packing and worker processes together: Energon 7.4.1 then restores a saved state to the
    #: wrong position (samples repeat), so that combination is refused.
    shuffle_buffer_size: int = 0
    #: Energon reads at most this many consecutive samples of a shard slice (None: whole slice).
    max_samples_per_sequence: int | None = None

    seed: int = 1234
    num_workers: int = 2
    split_part: str = "train"
    #: Loop over the data forever (training); False gives one epoch.
    repeat: bool = True
    #: Stop the loader with the issue counts after this many skipped samples in a row (all
    #: workers together), instead of waiting forever on data that yields nothing.
    max_consecutive_skips: int = 1000

    def __post_init__(self) -> None:
        problems = []
        if self.chat_template not in CHAT_TEMPLATES:
            problems.append(f"chat_template={self.chat_template!r} is not one of {CHAT_TEMPLATES}")
        if self.resize_mode not in RESIZE_MODES:
            problems.append(f"resize_mode={self.resize_mode!r} is not one of {RESIZE_MODES}")
        if self.num_frames < 1:
            problems.append(f"num_frames={self.num_frames} must be >= 1")
        if self.fps is not None and self.fps <= 0:
            problems.append(f"fps={self.fps} must be > 0")
        if self.max_frames < 1:
            problems.append(f"max_frames={self.max_frames} must be >= 1")
        if self.image_size < 1:
            problems.append(f"image_size={self.image_size} must be >= 1")
        if self.tokens_per_frame < 1:
            problems.append(f"tokens_per_frame={self.tokens_per_frame} must be >= 1")
        if self.max_seq_length < 2:
            problems.append(f"max_seq_length={self.max_seq_length} must be >= 2")
        if self.micro_batch_size < 1:
            problems.append(f"micro_batch_size={self.micro_batch_size} must be >= 1")
        if self.packing and self.packing_buffer_size < 1:
            problems.append(f"packing_buffer_size={self.packing_buffer_size} must be >= 1")
        if self.max_consecutive_skips < 1:
            problems.append(f"max_consecutive_skips={self.max_consecutive_skips} must be >= 1")
        if self.num_workers < 0:
            problems.append(f"num_workers={self.num_workers} must be >= 0")
        if self.max_samples_per_sequence is not None and self.max_samples_per_sequence < 1:
            problems.append(
                f"max_samples_per_sequence={self.max_samples_per_sequence} must be >= 1 or None"
            )
        if self.packing and self.shuffle_buffer_size > 1 and self.num_workers > 0:
            problems.append(
                f"shuffle_buffer_size={self.shuffle_buffer_size} with packing and "
                f"num_workers={self.num_workers}: Energon 7.4.1 cannot restore that state exactly; "
                "packing already reorders samples within its buffer, so set shuffle_buffer_size=0"
            )
        if problems:
            raise ValueError("invalid DataConfig: " + "; ".join(problems))
