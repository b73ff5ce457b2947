"""PipelineConfig: one field per command-line flag, frozen and validated.

Every job builds exactly one :class:`PipelineConfig` from its flags (``jobs/_cli.py`` maps each field to
one ``--flag``, whose ``--help`` is the field's help text) and hands it to
:func:`pipeline.run.run_pipeline`. A bad value raises ``ValueError`` here, before Ray starts or any model
loads. Each field's help says what it trades off.

The stages' own settings come from here, never from hand copies of the fields (and the model actor's
constructor arguments, :class:`AnnotatorSettings`, are defined here too, so the driver never imports
the actor's module, nor torch):
:meth:`PipelineConfig.std_config` (the decoder's ``StdConfig``), :meth:`PipelineConfig.frame_sampling`
(the decode stage's ``FrameSampling``) and :meth:`PipelineConfig.storage_options` (every filesystem).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from pipeline.storage import StorageOptions
from std_core.config import StaticSteps, StdConfig

if TYPE_CHECKING:  # pipeline.frames loads the video decoders: imported where a sampling is built
    from pipeline.frames import FrameSampling

Task = Literal["caption", "qa", "mcq"]
DecoderMode = Literal["std", "dense", "auto"]
IfExists = Literal["fail", "resume", "overwrite"]
DType = Literal["auto", "float32", "bfloat16", "float16"]
SharePrefill = Literal["on", "off"]
McqParserName = Literal["default", "lmms-eval"]

TASKS: tuple[str, ...] = ("caption", "qa", "mcq")
DECODERS: tuple[str, ...] = ("std", "dense", "auto")
IF_EXISTS: tuple[str, ...] = ("fail", "resume", "overwrite")
DTYPES: tuple[str, ...] = ("auto", "float32", "bfloat16", "float16")
SHARE_PREFILL: tuple[str, ...] = ("on", "off")
MCQ_PARSER_NAMES: tuple[str, ...] = ("default", "lmms-eval")  # the keys of pipeline.prompts.MCQ_PARSERS
DEFAULT_OUTPUT = "./out"
MIN_PIXELS = 28 * 28  # one merged vision patch of Qwen2-VL: a frame cannot be smaller than one token
MAX_FRAMES = 10_000  # ~2.8 hours at 1 fps; more frames than this is a typo, not a run that fits in memory


def flag(default: Any, help: str, *, name: str | None = None) -> Any:
    """A config field that is one command-line flag: its ``--help`` text (what the flag does and what it
    trades off), and the flag's name where it is not the field's (``name="budget"``: ``--budget``).
    ``jobs/_cli.py`` builds every job's parser from these fields."""
    metadata = {"help": help} if name is None else {"help": help, "flag": name}
    return field(default=default, metadata=metadata)


@dataclass(frozen=True)
class PipelineConfig:
    """Everything a run needs. ``None`` means "the documented default", resolved at run time."""

    # --- where data comes from and goes -------------------------------------------------------------
    input: str | None = flag(
        None,
        (
            "A prefix/glob of videos or a manifest (.parquet/.jsonl/.csv with video_uri). None: generate a "
            "few sample videos locally (the embedded default; nothing to download)."
        ),
    )
    output: str = flag(
        DEFAULT_OUTPUT,
        "Output folder (local path or s3://...). Parquet parts + _summary.json land here.",
    )
    if_exists: IfExists = flag(
        "fail",
        (
            'What to do when the output already holds rows: "fail" (safe default, like Spark\'s '
            'ErrorIfExists), "resume" (skip ids that have an ok row; what jobs.annotate always does), '
            '"overwrite" (delete them).'
        ),
    )
    endpoint_url: str | None = flag(
        None,
        "S3-compatible endpoint. None: AWS_ENDPOINT_URL or AWS itself, as boto3 and the AWS CLI do.",
    )
    anon: bool = flag(
        False,
        (
            "Unsigned requests for public buckets; no credentials needed, but private objects become "
            "invisible."
        ),
    )
    profile: str | None = flag(
        None,
        "AWS profile from ~/.aws/config. None: AWS_PROFILE / the default credential chain.",
    )

    # --- model and decoder --------------------------------------------------------------------------
    model: str | None = flag(
        None,
        (
            "Local directory, object-storage URI (copied once per node to a local cache) or hub id. None: the"
            " project's default demo model."
        ),
    )
    decoder: DecoderMode = flag(
        "auto",
        (
            '"std" drafts with sparse visual attention and verifies densely (same output, faster on long '
            'videos); "dense" is plain decoding through the same code path (the baseline); "auto" measures '
            "the step costs and picks the drafts per round, or dense where StD cannot win (same output)."
        ),
    )
    gamma: int = flag(
        9,
        (
            "Drafts per StD round. Larger amortises each verify over more tokens, but wastes more drafts "
            "after a rejection."
        ),
    )
    sparse_budget: int = flag(
        1024,
        (
            "Prompt tokens kept in the sparse draft cache per (layer, KV head). Smaller drafts faster but "
            "gets fewer drafts accepted."
        ),
    )
    static_steps: StaticSteps = flag(
        "auto",
        (
            '"compile" runs the draft and verify steps as static-shape steps under torch.compile (CUDA '
            'graphs on a GPU), compiled once per shape bucket on its first use; "eager" the same steps '
            'uncompiled; "off" the plain forward. "auto": "off" (on CPU compiled steps cost about what eager '
            "ones do, after 10-20 s of compiling per shape; they have not yet been checked on a GPU). Same "
            "output either way."
        ),
    )
    dense_sample: int = flag(
        1,
        (
            "Batches per actor that are decoded a second time densely, to measure the speedup and check that "
            "StD output is identical (a run of several --segment-videos segments starts new actors for each). "
            "0 disables (no overhead); -1 compares every batch (what evaluate does)."
        ),
    )
    dtype: DType = flag(
        "auto",
        '"auto": bfloat16 on GPU, float32 on CPU. float32 is exact but twice the memory and slower on GPU.',
    )
    max_new_tokens: int = flag(
        128,
        "Upper bound on generated tokens per row. Longer captions cost proportionally more decode time.",
    )
    temperature: float = flag(
        0.0,
        "0: greedy (deterministic, the lossless reference). > 0: sampling (StD stays distribution-exact).",
    )
    seed: int = flag(0, "Seed for sampling and for the generated sample videos.")

    # --- task ---------------------------------------------------------------------------------------
    task: Task = flag(
        "caption",
        (
            "caption: one row per video; qa: one row per question; mcq: one letter per question, scored when "
            "the manifest has answers."
        ),
    )
    prompt: str | None = flag(
        None,
        (
            "Caption prompt override. None: pipeline.prompts.CAPTION_PROMPT (what the demo model was trained "
            "on)."
        ),
    )

    share_prefill: SharePrefill = flag(
        "on",
        (
            'qa/mcq: "on" prefills each video once for all its questions in a batch (vision tower and the '
            'video\'s prefill shared; each question keeps its own sparse selection; same output); "off" '
            "prefills every question's whole prompt (the earlier behaviour, kept for measuring)."
        ),
    )

    mcq_parser: McqParserName = flag(
        "default",
        (
            'How an MCQ answer becomes an option letter (the rows\' predicted / correct): "default", the '
            'first standalone option letter; "lmms-eval", lmms-eval\'s parsing (strips "The best answer is" '
            "and the like), so benchmark accuracies compare with published ones."
        ),
    )

    # --- frames -------------------------------------------------------------------------------------
    num_frames: int = flag(
        8,
        (
            "Frames sampled uniformly per video; with --fps, the cap. More frames: more visual tokens, better"
            " temporal coverage, slower prefill and decode."
        ),
    )
    fps: float | None = flag(
        None,
        "Sample at this rate (frames per second of video) instead of uniformly, at most num_frames.",
    )
    max_pixels: int | None = flag(
        None,
        (
            "Frames are downscaled on decode to at most this many pixels (aspect kept). None: the model "
            "processor's own per-frame limit. Smaller: less bandwidth and fewer visual tokens, less detail."
        ),
    )

    max_decode_mib: int = flag(
        1024,
        (
            "Memory one video's decode may take (MiB), estimated from its header before decoding; a video "
            "over it is an error row, never an out-of-memory kill. Larger: bigger or longer-GOP videos pass, "
            "but each decode task reserves more of its node's memory (fewer decode in parallel)."
        ),
    )

    # --- scale --------------------------------------------------------------------------------------
    batch_size: int = flag(
        4,
        "Videos per actor batch. Larger batches use the GPU better but hold more frames in memory.",
    )
    num_actors: int = flag(
        1,
        "Model actors (one model copy each). On a GPU cluster: the number of GPUs to use.",
    )
    num_gpus: float | None = flag(
        None,
        (
            "GPUs per model actor. None: 1 if the Ray cluster has GPUs, else 0 (CPU). On an autoscaling "
            "cluster whose GPU nodes start on demand, pass 1 explicitly."
        ),
    )
    rows_per_file: int = flag(
        256,
        "Rows buffered per Parquet file. Larger: fewer files, but more rows redone after a crash.",
    )
    segment_videos: int = flag(
        500_000,
        (
            "Videos per Ray Dataset: a larger run executes one per segment, one after the other, so the "
            "driver's memory for Ray Data's per-block records (~2.2 KB per block of each stage) is freed as each ends. Each "
            "segment starts its own model actors (the model loads again) and drains before the next: on "
            "a cluster where a segment takes minutes, raise it."
        ),
    )
    limit: int | None = flag(
        None,
        "Process at most this many task items (after resume filtering). None: all. Bounds a scheduled run.",
    )
    dry_run: bool = flag(
        False,
        (
            "Plan only: check storage, model and output, list the inputs, apply the resume set and --limit, "
            "and print the plan (items to run, items done, items deferred) as the final JSON line. Loads no "
            "model, starts no Ray actor, writes nothing."
        ),
    )
    wait_for_lease: bool = flag(
        False,
        (
            "When another run holds the output (its _lease.json), wait for it to finish instead of failing "
            "at once. Either way two runs never work on one output together."
        ),
    )
    wait_for_resources: bool = flag(
        False,
        (
            "Start even when the Ray cluster lacks the actors' CPUs or GPUs right now (an autoscaling cluster "
            "adds nodes on demand). Without it such a run fails at once, saying what to change."
        ),
    )
    num_samples: int = flag(4, "Sample videos generated for the embedded default (no --input).")
    run_id: str | None = flag(
        None,
        "Tag written into every row and the summary. None: a UTC timestamp plus a random suffix.",
    )

    def __post_init__(self) -> None:
        _one_of("task", self.task, TASKS)
        _one_of("decoder", self.decoder, DECODERS)
        _one_of("if_exists", self.if_exists, IF_EXISTS)
        _one_of("dtype", self.dtype, DTYPES)
        _one_of("share_prefill", self.share_prefill, SHARE_PREFILL)
        _one_of("mcq_parser", self.mcq_parser, MCQ_PARSER_NAMES)
        for name in ("gamma", "sparse_budget", "max_new_tokens", "batch_size", "num_actors"):
            _positive_int(name, getattr(self, name))
        _positive_int("num_frames", self.num_frames, most=MAX_FRAMES)
        _positive_int("rows_per_file", self.rows_per_file)
        _positive_int("segment_videos", self.segment_videos)
        _positive_int("max_decode_mib", self.max_decode_mib)
        _positive_int("num_samples", self.num_samples)
        if self.limit is not None:
            _positive_int("limit", self.limit)
        if self.max_pixels is not None:
            _positive_int("max_pixels", self.max_pixels, least=MIN_PIXELS, why=" (28*28, one vision patch)")
        if not isinstance(self.dense_sample, int) or self.dense_sample < -1:
            raise ValueError(
                f"dense_sample must be -1 (all), 0 (off) or a batch count, got {self.dense_sample!r}"
            )
        if self.fps is not None and not _finite(self.fps) > 0:
            raise ValueError(f"fps must be a finite number > 0, got {self.fps!r}")
        if not _finite(self.temperature) >= 0:
            raise ValueError(
                f"temperature must be a finite number >= 0 (0: greedy), got {self.temperature!r}"
            )
        if self.num_gpus is not None:
            _check_num_gpus(self.num_gpus)
        if self.input is not None and not self.input.strip():
            raise ValueError("input must be a path or URI (leave --input out for the sample videos)")
        if not self.output:
            raise ValueError("output must be a path or URI")
        self.std_config()  # the decoder's own validation, before anything runs

    def std_config(self) -> StdConfig:
        """The decoder's configuration: ``--decoder``, ``--gamma``, ``--sparse-budget`` and
        ``--static-steps``."""
        return StdConfig(
            mode=self.decoder,
            gamma=self.gamma,
            sparse_budget=self.sparse_budget,
            static_steps=self.static_steps,
        )

    def frame_sampling(self, model_max_pixels: int) -> FrameSampling:
        """How the decode stage samples and sizes frames; ``model_max_pixels`` (the model processor's
        per-frame limit) applies unless ``--max-pixels`` is given."""
        from pipeline.frames import FrameSampling

        return FrameSampling(
            self.num_frames, self.fps, self.max_pixels or model_max_pixels, self.max_decode_mib << 20
        )

    def storage_options(self) -> StorageOptions:
        """Credentials and endpoint for every filesystem the run touches (input, output, model)."""
        return StorageOptions(endpoint_url=self.endpoint_url, anon=self.anon, profile=self.profile)


def _one_of(name: str, value: object, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")


def _positive_int(name: str, value: object, least: int = 1, most: int | None = None, why: str = "") -> None:
    """``value`` is an int (not a bool) in ``[least, most]``; ``why`` explains ``least`` in the message."""
    if not isinstance(value, int) or isinstance(value, bool) or value < least:
        raise ValueError(f"{name} must be an integer >= {least}{why}, got {value!r}")
    if most is not None and value > most:
        raise ValueError(f"{name} must be an integer <= {most:,}, got {value!r}")


def _finite(value: object) -> float:
    """``value`` as a float where it is a finite number, else NaN (which fails every comparison)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return math.nan
    return float(value)


def _check_num_gpus(value: object) -> None:
    """Ray's rule: a fraction of one GPU (several actors share it) or a whole number of GPUs."""
    gpus = _finite(value)
    if not gpus >= 0:
        raise ValueError(f"num_gpus must be a finite number >= 0, got {value!r}")
    if gpus > 1 and not gpus.is_integer():
        raise ValueError(f"num_gpus must be a fraction <= 1 or a whole number of GPUs, got {value!r}")


@dataclass(frozen=True)
class AnnotatorSettings:
    """The actor's constructor arguments: small and picklable (a model location, never weights)."""

    model: str | None
    model_label: str
    run_id: str
    storage: StorageOptions = field(default_factory=StorageOptions)
    std: StdConfig = field(default_factory=StdConfig)  # the decoder's configuration
    dense_sample: int = 1
    dtype: str = "auto"
    max_new_tokens: int = 128
    temperature: float = 0.0
    seed: int = 0
    use_gpu: bool = False
    max_items_per_call: int = 16  # items generated together (bounds memory; a video's questions may split)
    share_prefill: bool = True  # one prefill per video for its questions (std_core.generate_shared)
    mcq_parser: str = "default"  # a key of pipeline.prompts.MCQ_PARSERS
