"""The configuration schema: one frozen dataclass per section, validated on construction.

Every setting is declared once, here or in the section dataclasses of ``ofa/embedding.py``,
``ofa/selector.py`` and ``evaluation/methods.py``, with its default and help text (``setting``).
The home's ``icons.json``, the Dagster resources and the CLI's flags are all generated
from these fields (``schema.py``, ``resources/``, ``cli.py``), and every artifact's
fingerprint is derived from them, so a field added here changes the paths of everything
downstream of it: that is the point. Defaults follow the ICONS paper and LLaVA-1.5's LoRA
recipe; the demo bootstrap writes a few others into its ``icons.json``.
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any

from icons_dagster.core.selection.consensus import AGGREGATIONS, TIEBREAKS

# "auto": the Linear layers inside the model's language model, resolved per architecture
# (core/model/loading.py); the vision tower, the multimodal projector and lm_head are never adapted.
# Any other value is a regex peft matches in full against module paths.
AUTO_LORA_TARGET = "auto"

DTYPES = ("auto", "float32", "bfloat16", "float16")
AUTOCAST_MODES = ("auto", "off", "bfloat16", "float16")
PROJECTORS = ("countsketch", "rademacher")
GRADIENT_TYPES = ("sgd", "adam")


def setting(
    default: Any,
    help: str,
    *,
    aliases: tuple[str, ...] = (),
    choices: tuple[str, ...] | None = None,
    flag: str | None = None,
    mapping: bool = False,
    path: bool = False,
):
    """A config field: its default, the help the CLI and the UI show, the CLI's extra flag
    names (``aliases``), its allowed values (``choices``, checked by ``check_choices``), a
    flag name other than ``--<section>-<field>`` (``flag``), ``mapping``: a field held as
    sorted ``(key, value)`` pairs (hashable, fingerprint-stable) and written as a JSON
    object, and ``path``: a local path the CLI makes absolute."""
    metadata = {"help": help, "aliases": aliases, "choices": choices, "flag": flag, "mapping": mapping, "path": path}
    if isinstance(default, (list, dict, set)):
        raise TypeError("config defaults are immutable: use a tuple")
    return field(default=default, metadata=metadata)


def normalize_mappings(config: object) -> None:
    """Turn the JSON object given for a ``mapping`` field into its sorted pairs (in place,
    from a frozen dataclass's ``__post_init__``)."""
    for f in fields(config):  # type: ignore[arg-type]
        value = getattr(config, f.name)
        if f.metadata.get("mapping") and not isinstance(value, tuple):
            pairs = value.items() if isinstance(value, dict) else value
            object.__setattr__(config, f.name, tuple(sorted((str(k), v) for k, v in pairs)))


def check_choices(config: object) -> None:
    """Every field declared with ``choices`` holds one of them."""
    for f in fields(config):  # type: ignore[arg-type]
        allowed = f.metadata.get("choices")
        if allowed is not None and getattr(config, f.name) not in allowed:
            raise ValueError(f"{type(config).__name__}.{f.name}: unknown value {getattr(config, f.name)!r}; choose from {list(allowed)}")


def field_default(f) -> Any:
    return f.default if f.default is not MISSING else f.default_factory()  # type: ignore[misc]


_CONFIGURE = "run `icons-dagster demo` (the embedded demo) or `icons-dagster run --pool ... --benchmarks ...`"


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


# The largest image (width x height) a record may have: well below PIL's decompression-bomb
# warning (89,478,485) and error (twice that), above any photo or document LLaVA-style data
# holds (a 48 MP phone photo is 8000 x 6000). data.max_image_pixels sets it.
DEFAULT_MAX_IMAGE_PIXELS = 40_000_000
PIL_MAX_IMAGE_PIXELS = 2 * 89_478_485  # PIL refuses to open larger ones


def image_limit_fields(max_pixels: int) -> dict:
    """The limit in a fingerprint: absent at its default, so artifacts built before it stay valid."""
    return {} if max_pixels == DEFAULT_MAX_IMAGE_PIXELS else {"max_image_pixels": max_pixels}


@dataclass(frozen=True)
class DataConfig:
    """Where the pool, its images and the benchmarks are, and how the pool is sharded."""

    pool: str = setting("", "LLaVA-format JSON/JSONL pool", aliases=("--pool",), path=True)
    image_root: str = setting("", "folder the pool's image paths are relative to", aliases=("--image-root",), path=True)
    benchmarks: str = setting("", "folder with one sub-folder per benchmark (val.json required); ICONS needs it", aliases=("--benchmarks",), path=True)
    # Shards are sha256(id) mod num_shards: fixed by configuration, so the partitions exist
    # before anything runs and new records touch only their shards.
    num_shards: int = setting(4, "training-gradient shards (partitions of training_gradients)", aliases=("--shards",))
    max_image_pixels: int = setting(
        DEFAULT_MAX_IMAGE_PIXELS,
        "largest image (width x height) a record may have; a larger one is skipped and listed before any pixel is decoded",
        aliases=("--max-image-pixels",),
    )

    def __post_init__(self) -> None:
        _require(1 <= self.num_shards <= 100_000, f"num_shards must be in [1, 100000], got {self.num_shards}")
        _require(
            1 <= self.max_image_pixels <= PIL_MAX_IMAGE_PIXELS,
            f"max_image_pixels must be in [1, {PIL_MAX_IMAGE_PIXELS}] (PIL refuses larger images), got {self.max_image_pixels}",
        )

    def pool_path(self) -> Path:
        _require(bool(self.pool), f"no pool configured (data.pool): {_CONFIGURE}")
        return Path(self.pool).expanduser().resolve()

    def image_root_path(self) -> Path | None:
        return Path(self.image_root).expanduser().resolve() if self.image_root else None

    def benchmarks_path(self) -> Path:
        _require(bool(self.benchmarks), f"no benchmarks folder configured (data.benchmarks): {_CONFIGURE}")
        return Path(self.benchmarks).expanduser().resolve()


@dataclass(frozen=True)
class ModelConfig:
    """Which checkpoint to load and how."""

    name_or_path: str = setting(
        "",
        "hub id or local folder: an image-text-to-text checkpoint (LLaVA, Qwen2.5-VL, Idefics3/SmolVLM) or a text-only causal LM",
        aliases=("--model",),
    )
    revision: str | None = setting(None, "hub revision (branch, tag or commit)", aliases=("--revision",))
    trust_remote_code: bool = setting(False, "allow the checkpoint's own Python code (off unless asked)", aliases=("--trust-remote-code",))
    dtype: str = setting("auto", "weights' dtype (auto: bfloat16 on CUDA, float32 on CPU)", aliases=("--dtype",), choices=DTYPES)
    device: str = setting("auto", "auto: cuda when available, else cpu; cuda:lease: a free GPU per run process", aliases=("--device",))
    max_length: int = setting(2048, "tokens per sequence (LLaVA's 2048); longer ones are truncated and counted", aliases=("--max-length",))
    # Per-sample gradients and features accumulate in fp32 whatever the autocast.
    autocast: str = setting("auto", "mixed precision of forward passes (auto: bf16 on CUDA, off elsewhere)", aliases=("--autocast",), choices=AUTOCAST_MODES)
    # The model then runs in train mode with every dropout turned off; the features are the same.
    gradient_checkpointing: bool = setting(False, "recompute activations in backward (less GPU memory, ~30% more time)", aliases=("--gradient-checkpointing",))
    # Off = faster atomics-based kernels (index_add_, attention backward) whose float sums vary per run.
    deterministic: bool = setting(True, "CUDA: deterministic kernels, byte-identical reruns", aliases=("--deterministic",))

    def __post_init__(self) -> None:
        check_choices(self)
        _require(self.max_length >= 16, f"max_length must be >= 16, got {self.max_length}")


@dataclass(frozen=True)
class LoraSettings:
    """LoRA on the language model's linear layers (LLaVA-1.5 LoRA defaults)."""

    r: int = setting(128, "LoRA rank")
    alpha: int = setting(256, "LoRA alpha")
    dropout: float = setting(0.05, "LoRA dropout while warming up (gradients are taken in eval mode)")
    target_modules: str = setting(AUTO_LORA_TARGET, "auto: the language model's Linear layers; else a regex on module paths")

    def __post_init__(self) -> None:
        _require(self.r > 0 and self.alpha > 0, "LoRA r and alpha must be positive")
        _require(0.0 <= self.dropout < 1.0, f"LoRA dropout must be in [0, 1), got {self.dropout}")


@dataclass(frozen=True)
class WarmupConfig:
    """The LoRA warm-up on a seeded random share of the pool (paper §2.3 step 1)."""

    ratio: float = setting(0.05, "share of the pool the warm-up trains on")
    seed: int = setting(0, "seed of the warm-up subset and the fresh adapter")
    learning_rate: float = setting(2e-4, "AdamW learning rate", aliases=("--learning-rate",))
    epochs: int = setting(1, "epochs over the warm-up subset", aliases=("--epochs",))
    num_checkpoints: int = setting(1, "checkpoints kept, evenly spaced over all steps (adapter + Adam moments each)", aliases=("--num-checkpoints",))
    batch_size: int = setting(4, "warm-up batch size")
    warmup_ratio: float = setting(0.03, "share of the steps with a linear LR warm-up before the cosine decay", flag="--warmup-lr-warmup-ratio")
    weight_decay: float = setting(0.0, "AdamW weight decay")
    adam_betas: tuple[float, float] = setting((0.9, 0.999), "AdamW betas")
    adam_eps: float = setting(1e-8, "AdamW eps")

    def __post_init__(self) -> None:
        _require(0.0 < self.ratio <= 1.0, f"warmup ratio must be in (0, 1], got {self.ratio}")
        _require(self.epochs >= 1 and self.num_checkpoints >= 1, "epochs and num_checkpoints must be >= 1")
        _require(self.batch_size >= 1, "warmup batch_size must be >= 1")
        _require(self.learning_rate > 0, "learning_rate must be positive")


@dataclass(frozen=True)
class GradientConfig:
    """Per-sample gradient features: projector, dimension, seed and gradient type."""

    projector: str = setting("countsketch", "random projection (rademacher: the dense reference)", aliases=("--projector",), choices=PROJECTORS)
    dim: int = setting(5120, "projected dimension d'", aliases=("--projection-dim",))
    seed: int = setting(0, "projection seed", aliases=("--projection-seed",))
    train_gradient: str = setting("sgd", "training gradients: sgd (paper) or adam (LESS); validation is always sgd", aliases=("--train-gradient",), choices=GRADIENT_TYPES)
    batch_size: int = setting(8, "samples per forward and backward", aliases=("--gradient-batch-size",))
    length_grouping: int = setting(16, "sort windows of this many batches by length before batching (1: input order)", aliases=("--gradient-length-grouping",))
    adam_eps: float = setting(1e-8, "eps of the Adam preconditioner m' / (sqrt(v') + eps), no bias correction")

    def __post_init__(self) -> None:
        check_choices(self)
        _require(self.dim >= 1, "projection dim must be >= 1")
        _require(self.batch_size >= 1, "gradient batch_size must be >= 1")
        _require(self.length_grouping >= 1, "gradient length_grouping must be >= 1 (1 keeps input order)")


@dataclass(frozen=True)
class InfluenceConfig:
    """What task_influence stores beside each sample's score."""

    write_matrix: bool = setting(False, "also store each benchmark's full |D| x |V| influence matrix")


@dataclass(frozen=True)
class SelectionConfig:
    """Consensus and selection (paper §2.4): p sets both the vote threshold and the subset size."""

    p: float = setting(0.2, "selection ratio: vote threshold percentile and subset size", aliases=("--p",))
    method: str = setting("vote", "how benchmarks' influences combine", aliases=("--aggregation",), choices=tuple(AGGREGATIONS))
    # optional weighted voting: {benchmark: weight}, 1 for the others
    task_weights: tuple[tuple[str, float], ...] = setting((), "per-benchmark vote weights, JSON {name: weight}", mapping=True)
    tiebreak: str = setting("mean-rank", "order of records with equal aggregates", aliases=("--tiebreak",), choices=TIEBREAKS)
    # 0 is the paper's rule. 0.5: on the demo the paper's vote drops whole task families and
    # scores below random at every ratio, seed, warm-up and dimension (bench/RESULTS.md).
    coverage: float = setting(0.5, "share of the subset reserved for each benchmark's own top records (0 = the paper's vote)", aliases=("--coverage",))

    def __post_init__(self) -> None:
        normalize_mappings(self)
        object.__setattr__(self, "task_weights", tuple((k, float(v)) for k, v in self.task_weights))
        check_choices(self)
        _require(0.0 < self.p <= 1.0, f"selection ratio p must be in (0, 1], got {self.p}")
        _require(0.0 <= self.coverage <= 1.0, f"coverage must be in [0, 1], got {self.coverage}")

    def weights_for(self, benchmarks: list[str]) -> list[float] | None:
        if not self.task_weights:
            return None
        given = dict(self.task_weights)
        unknown = sorted(set(given) - set(benchmarks))
        _require(not unknown, f"task_weights name benchmarks that are not registered: {unknown}")
        return [float(given.get(name, 1.0)) for name in benchmarks]


@dataclass(frozen=True)
class StoreConfig:
    """The store every machine of a scale-out shares (the home is the local root)."""

    remote: str = setting("", "fsspec URL (s3://, gs://, file://) of a store shared by many machines; env ICONS_STORE_URL")


@dataclass(frozen=True)
class AutomationConfig:
    """When the daemon looks for new benchmarks, and when the vote is redone without one."""

    vote_cron: str = setting("0 4 * * *", "cron of the vote schedule (stopped until started in the UI)")
    sensor_interval_seconds: int = setting(30, "how often the daemon scans the benchmarks folder and evaluates the automation conditions")

    def __post_init__(self) -> None:
        if self.sensor_interval_seconds < 1:
            raise ValueError(f"automation.sensor_interval_seconds must be at least 1, got {self.sensor_interval_seconds}")


@dataclass(frozen=True)
class CatalogConfig:
    """How every asset shows in Dagster's catalog: who owns it and the tags it carries."""

    owners: tuple[str, ...] = setting((), 'owners of every asset, as Dagster takes them: "team:<name>" or an e-mail address')
    tags: tuple[tuple[str, Any], ...] = setting((), "tags on every asset, JSON {key: value} (strings)", mapping=True)

    def __post_init__(self) -> None:
        normalize_mappings(self)
        for owner in self.owners:
            if not (owner.startswith("team:") and len(owner) > 5) and "@" not in owner:
                raise ValueError(f'catalog.owners: {owner!r} is neither "team:<name>" nor an e-mail address')
        for key, value in self.tags:
            if not isinstance(value, str):
                raise ValueError(f"catalog.tags: the value of {key!r} must be a string, got {value!r}")


@dataclass(frozen=True)
class ScaleoutConfig:
    """How the shard runs spread over machines (deploy/): run tags and the shard job's executor."""

    shard_run_tags: tuple[tuple[str, Any], ...] = setting((), "tags on every shard run, JSON {tag: value} (e.g. dagster-k8s/config)", mapping=True)
    shard_executor: Any = setting("in_process", 'the shard job\'s executor: "in_process", "celery" or {"celery": {...}}')

    def __post_init__(self) -> None:
        normalize_mappings(self)
