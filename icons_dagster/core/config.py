"""Frozen configuration of every stage, validated on construction.

Every artifact's fingerprint is derived from these objects (see ``fingerprint.py``), so a
field added here changes the paths of everything downstream of it: that is the point.
Defaults follow the ICONS paper and LLaVA-1.5's LoRA recipe; the demo overrides a few.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

# "auto": the Linear layers inside the model's language model, resolved per architecture
# (core/model.py); the vision tower, the multimodal projector and lm_head are never adapted.
# Any other value is a regex peft matches in full against module paths.
AUTO_LORA_TARGET = "auto"
DEFAULT_LORA_TARGET = AUTO_LORA_TARGET


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


@dataclass(frozen=True)
class ModelConfig:
    """Which checkpoint to load and how."""

    name_or_path: str
    revision: str | None = None
    trust_remote_code: bool = False  # off unless the user turns it on
    dtype: str = "auto"  # "auto": bfloat16 on CUDA, float32 on CPU; or float32/bfloat16/float16
    device: str = "auto"  # "auto": cuda when available, else cpu; "cuda:lease": a free GPU per run process
    max_length: int = 2048  # tokens; longer sequences are truncated and counted
    # Mixed precision of the forward pass: "auto" = bfloat16 autocast on CUDA, off elsewhere;
    # "off", "bfloat16" or "float16". Per-sample gradients and features accumulate in fp32.
    autocast: str = "auto"
    # Recompute activations in the backward pass (less memory, ~30% more time); the features
    # are the same. The model then runs in train mode with every dropout turned off.
    gradient_checkpointing: bool = False
    # CUDA only: deterministic kernels (torch.use_deterministic_algorithms, a fixed cuBLAS
    # workspace), so a rerun on the same GPU writes byte-identical features; off = faster
    # atomics-based kernels (index_add_, attention backward) whose float sums vary per run.
    deterministic: bool = True

    def __post_init__(self) -> None:
        _require(bool(self.name_or_path), "model name_or_path must not be empty")
        _require(self.dtype in {"auto", "float32", "bfloat16", "float16"}, f"unknown dtype {self.dtype!r}")
        _require(self.autocast in {"auto", "off", "bfloat16", "float16"}, f"unknown autocast {self.autocast!r}")
        _require(self.max_length >= 16, f"max_length must be >= 16, got {self.max_length}")


@dataclass(frozen=True)
class LoraSettings:
    """LoRA on the language model's linear layers (LLaVA-1.5 LoRA defaults)."""

    r: int = 128
    alpha: int = 256
    dropout: float = 0.05  # used while warming up only; gradients are taken in eval mode
    target_modules: str = DEFAULT_LORA_TARGET

    def __post_init__(self) -> None:
        _require(self.r > 0 and self.alpha > 0, "LoRA r and alpha must be positive")
        _require(0.0 <= self.dropout < 1.0, f"LoRA dropout must be in [0, 1), got {self.dropout}")


@dataclass(frozen=True)
class WarmupConfig:
    """The LoRA warm-up on a seeded random share of the pool (paper §2.3 step 1)."""

    ratio: float = 0.05
    seed: int = 0
    learning_rate: float = 2e-4
    epochs: int = 1
    num_checkpoints: int = 1  # evenly spaced over all steps; each keeps adapter + Adam moments
    batch_size: int = 4
    warmup_ratio: float = 0.03  # of the steps, linear LR warm-up before the cosine decay
    weight_decay: float = 0.0
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8

    def __post_init__(self) -> None:
        _require(0.0 < self.ratio <= 1.0, f"warmup ratio must be in (0, 1], got {self.ratio}")
        _require(self.epochs >= 1 and self.num_checkpoints >= 1, "epochs and num_checkpoints must be >= 1")
        _require(self.batch_size >= 1, "warmup batch_size must be >= 1")
        _require(self.learning_rate > 0, "learning_rate must be positive")


@dataclass(frozen=True)
class GradientConfig:
    """Per-sample gradient features: projector, dimension, seed and gradient type."""

    projector: str = "countsketch"  # or "rademacher" (dense reference)
    dim: int = 5120
    seed: int = 0
    train_gradient: str = "sgd"  # "sgd" (paper) or "adam" (LESS); validation is always sgd
    batch_size: int = 8
    # batches are cut from windows of this many batches sorted by length (1: input order)
    length_grouping: int = 16
    adam_eps: float = 1e-8  # added outside the sqrt: m' / (sqrt(v') + eps), no bias correction

    def __post_init__(self) -> None:
        _require(self.projector in {"countsketch", "rademacher"}, f"unknown projector {self.projector!r}")
        _require(self.dim >= 1, "projection dim must be >= 1")
        _require(self.train_gradient in {"sgd", "adam"}, f"train_gradient must be sgd or adam, got {self.train_gradient!r}")
        _require(self.batch_size >= 1, "gradient batch_size must be >= 1")
        _require(self.length_grouping >= 1, "gradient length_grouping must be >= 1 (1 keeps input order)")


@dataclass(frozen=True)
class SelectionConfig:
    """Consensus and selection (paper §2.4): p sets both the vote threshold and the subset size."""

    p: float = 0.2
    method: str = "vote"  # vote | mean | max | rank | norm
    task_weights: tuple[tuple[str, float], ...] = field(default_factory=tuple)  # optional weighted voting
    tiebreak: str = "mean-rank"  # or "max-rank": how records with equal aggregates are ordered
    # share of the subset reserved for each benchmark's own top records (consensus.py);
    # 0 is the paper's rule. 0.5: on the demo the paper's vote drops whole task families and
    # scores below random at every ratio, seed, warm-up and dimension (bench/RESULTS.md).
    coverage: float = 0.5

    def __post_init__(self) -> None:
        _require(0.0 < self.p <= 1.0, f"selection ratio p must be in (0, 1], got {self.p}")
        _require(self.method in {"vote", "mean", "max", "rank", "norm"}, f"unknown aggregation {self.method!r}")
        _require(self.tiebreak in {"mean-rank", "max-rank"}, f"tiebreak must be mean-rank or max-rank, got {self.tiebreak!r}")
        _require(0.0 <= self.coverage <= 1.0, f"coverage must be in [0, 1], got {self.coverage}")

    def weights_for(self, benchmarks: list[str]) -> list[float] | None:
        if not self.task_weights:
            return None
        given = dict(self.task_weights)
        unknown = sorted(set(given) - set(benchmarks))
        _require(not unknown, f"task_weights name benchmarks that are not registered: {unknown}")
        return [float(given.get(name, 1.0)) for name in benchmarks]


@dataclass(frozen=True)
class PoolConfig:
    """How the pool is split into training-gradient shards."""

    num_shards: int = 4

    def __post_init__(self) -> None:
        _require(1 <= self.num_shards <= 100_000, f"num_shards must be in [1, 100000], got {self.num_shards}")


def as_dict(config: object) -> dict:
    """A JSON-ready dict of a config dataclass (tuples become lists)."""
    return asdict(config)  # type: ignore[arg-type]
