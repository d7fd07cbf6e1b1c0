"""Dagster resources: the store, the data, the model and the method settings.

Each turns its plain fields into the frozen core config objects; defaults run the
embedded demo on a laptop. The same values reach the CLI and the UI through the home
config file (``icons.json`` under the store root, see ``home.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from dagster import ConfigurableResource

from icons_dagster.core.config import (
    DEFAULT_LORA_TARGET,
    GradientConfig,
    LoraSettings,
    ModelConfig,
    SelectionConfig,
    WarmupConfig,
)
from icons_dagster.core.embedding import EmbedderConfig
from icons_dagster.core.evaluation_pipeline import EvaluationConfig
from icons_dagster.core.ofa import OFAConfig
from icons_dagster.core.store import ArtifactStore


class StoreResource(ConfigurableResource):
    """Root folder of every artifact, export and the Dagster instance; ``remote``: an fsspec
    URL (s3://, gs://, file:// on a shared disk) that every machine shares artifacts through."""

    root: str
    remote: str = ""

    def store(self) -> ArtifactStore:
        return ArtifactStore(self.root, self.remote or None)


@dataclass(frozen=True)
class DataPaths:
    pool: Path
    image_root: Path | None
    benchmarks: Path
    is_demo: bool


class DataResource(ConfigurableResource):
    """Where the pool, its images and the benchmarks folder are; empty pool = the demo."""

    pool: str = ""
    image_root: str = ""
    benchmarks: str = ""
    demo_size: str = "default"

    def paths(self, store: ArtifactStore) -> DataPaths:
        if not self.pool:
            from icons_dagster.demo.data import generate_demo

            demo = generate_demo(store.demo_dir / f"data-{self.demo_size}", size=self.demo_size)
            return DataPaths(demo.pool, demo.image_root, demo.benchmarks, is_demo=True)
        if not self.benchmarks:
            raise ValueError("a pool is configured but no benchmarks folder: set data.benchmarks")
        return DataPaths(
            Path(self.pool).expanduser().resolve(),
            Path(self.image_root).expanduser().resolve() if self.image_root else None,
            Path(self.benchmarks).expanduser().resolve(),
            is_demo=False,
        )


class ModelResource(ConfigurableResource):
    """The checkpoint (hub id or local folder; empty = the tiny demo model) and its LoRA."""

    name_or_path: str = ""
    revision: str = ""
    trust_remote_code: bool = False
    dtype: str = "auto"
    device: str = "auto"
    max_length: int = 2048
    autocast: str = "auto"  # bf16 autocast on CUDA; "off", "bfloat16", "float16"
    gradient_checkpointing: bool = False
    deterministic: bool = True  # CUDA: deterministic kernels, byte-identical reruns
    lora_r: int = 128
    lora_alpha: int = 256
    lora_dropout: float = 0.05
    lora_target_modules: str = DEFAULT_LORA_TARGET
    # Demo model only (empty name_or_path): 0 = the random tiny LLaVA; N > 0 = that model after
    # N steps of stage-1 alignment on separate generated captions (built once, cached), so
    # instruction tuning starts from a model that already connects images to text.
    demo_stage1_steps: int = 0

    def checkpoint_config(self, store: ArtifactStore) -> ModelConfig:
        name = self.name_or_path
        if not name and self.demo_stage1_steps > 0:
            from icons_dagster.demo.stage1 import ensure_stage1_model

            # about five passes over the captions, 500 to 4,000 of them
            n_records = min(4000, max(500, self.demo_stage1_steps * 16 // 5))
            name = str(ensure_stage1_model(store.demo_dir, self.demo_stage1_steps, n_records))
        elif not name:
            from icons_dagster.demo.build import ensure_demo_model

            name = str(ensure_demo_model(store.demo_dir))
        return ModelConfig(
            name_or_path=name,
            revision=self.revision or None,
            trust_remote_code=self.trust_remote_code,
            dtype=self.dtype,
            device=self.device,
            max_length=self.max_length,
            autocast=self.autocast,
            gradient_checkpointing=self.gradient_checkpointing,
            deterministic=self.deterministic,
        )

    def lora_settings(self) -> LoraSettings:
        return LoraSettings(self.lora_r, self.lora_alpha, self.lora_dropout, self.lora_target_modules)


class SettingsResource(ConfigurableResource):
    """Method settings: warm-up, gradient features and selection (paper defaults)."""

    warmup_ratio: float = 0.05
    warmup_seed: int = 0
    learning_rate: float = 2e-4
    epochs: int = 1
    num_checkpoints: int = 1
    warmup_batch_size: int = 4
    projector: str = "countsketch"
    projection_dim: int = 5120
    projection_seed: int = 0
    train_gradient: str = "sgd"
    gradient_batch_size: int = 8
    gradient_length_grouping: int = 16  # sort windows of this many batches by length (1: input order)
    p: float = 0.2
    aggregation: str = "vote"
    task_weights: dict[str, float] = {}
    tiebreak: str = "mean-rank"
    coverage: float = 0.5  # 0 = the paper's vote exactly
    write_influence_matrix: bool = False  # also store each benchmark's full |D| x |V| matrix

    def warmup(self) -> WarmupConfig:
        return WarmupConfig(
            ratio=self.warmup_ratio,
            seed=self.warmup_seed,
            learning_rate=self.learning_rate,
            epochs=self.epochs,
            num_checkpoints=self.num_checkpoints,
            batch_size=self.warmup_batch_size,
        )

    def gradients(self) -> GradientConfig:
        return GradientConfig(
            projector=self.projector,
            dim=self.projection_dim,
            seed=self.projection_seed,
            train_gradient=self.train_gradient,
            batch_size=self.gradient_batch_size,
            length_grouping=self.gradient_length_grouping,
        )

    def selection(self) -> SelectionConfig:
        return SelectionConfig(
            p=self.p,
            method=self.aggregation,
            task_weights=tuple(sorted(self.task_weights.items())),
            tiebreak=self.tiebreak,
            coverage=self.coverage,
        )


class OFAResource(ConfigurableResource):
    """The OFA selector: its embedder, k-means, the selector's training, and selection.

    ``selector`` (a folder with selector.json + selector.safetensors, e.g. another home's
    ``exports/ofa_selector``) reuses a trained selector instead of training one on this pool.
    """

    embedder: str = "minilm-pixels"  # or "clip"
    embedder_model: str = ""  # clip: hub id or local folder; minilm-pixels: "" = the packaged MiniLM
    embedder_revision: str = ""
    embedder_text: str = "conversation"
    embedder_image_weight: float = 0.5  # image part's share of the joint embedding (text: the rest)
    embedder_batch_size: int = 64
    embedder_device: str = "auto"
    trust_remote_code: bool = False
    num_clusters: int = 64
    kmeans_iterations: int = 50
    kmeans_seed: int = 0
    hidden_dim: int = 256
    epochs: int = 3
    min_steps: int = 300  # small pools: add epochs until the selector took this many steps
    batch_size: int = 256
    learning_rate: float = 1e-3
    train_seed: int = 0
    confidence: str = "max_softmax"
    p: float = 0.2
    selector: str = ""

    def embedder_config(self) -> EmbedderConfig:
        return EmbedderConfig(
            kind=self.embedder,
            name_or_path=self.embedder_model,
            revision=self.embedder_revision or None,
            text=self.embedder_text,
            image_weight=self.embedder_image_weight,
            batch_size=self.embedder_batch_size,
            device=self.embedder_device,
            trust_remote_code=self.trust_remote_code,
        )

    def ofa_config(self) -> OFAConfig:
        return OFAConfig(
            num_clusters=self.num_clusters,
            kmeans_iterations=self.kmeans_iterations,
            kmeans_seed=self.kmeans_seed,
            hidden_dim=self.hidden_dim,
            epochs=self.epochs,
            min_steps=self.min_steps,
            batch_size=self.batch_size,
            learning_rate=self.learning_rate,
            train_seed=self.train_seed,
            confidence=self.confidence,
            p=self.p,
        )

    def selector_source(self) -> Path | None:
        return Path(self.selector).expanduser().resolve() if self.selector else None


class EvaluationResource(ConfigurableResource):
    """The one fine-tuning recipe every method's subset gets, and the scoring settings.

    The subsets are cut at the selection's ``p`` (settings.p; OFA's ``p`` must match).
    """

    learning_rate: float = 2e-4
    epochs: int = 1
    batch_size: int = 4
    seed: int = 0
    max_new_tokens: int = 64
    equal_steps: bool = False  # True: every subset trains about as many steps as the full data
    lora_r: int = 0  # the fine-tune's LoRA rank and alpha; 0 = the model's (the warm-up's) LoRA
    lora_alpha: int = 0
    methods: list[str] = []  # which methods to compare (a subset of the partitions); [] = all

    def method_list(self) -> tuple[str, ...]:
        from icons_dagster.core.evaluation_pipeline import DEFAULT_METHODS

        unknown = [m for m in self.methods if m not in DEFAULT_METHODS]
        if unknown:
            raise ValueError(f"evaluation.methods {unknown} are not evaluation partitions; choose from {list(DEFAULT_METHODS)}")
        return tuple(m for m in DEFAULT_METHODS if m in self.methods) if self.methods else DEFAULT_METHODS

    def lora_settings(self, model_lora: LoraSettings) -> LoraSettings:
        """The LoRA every method's fine-tune gets (the selection's own LoRA unless set here)."""
        if not self.lora_r:
            return model_lora
        return LoraSettings(self.lora_r, self.lora_alpha or 2 * self.lora_r, model_lora.dropout, model_lora.target_modules)

    def evaluation_config(self, p: float) -> EvaluationConfig:
        return EvaluationConfig(
            methods=self.method_list(),
            p=p,
            learning_rate=self.learning_rate,
            epochs=self.epochs,
            batch_size=self.batch_size,
            seed=self.seed,
            max_new_tokens=self.max_new_tokens,
            equal_steps=self.equal_steps,
        )
