"""What each stage hands downstream: one frozen dataclass per stage's reference.

A reference says where the stage's artifact is (``path``, relative to the store root),
which fingerprint made it, whether it was reused, and the few facts downstream stages
need. The stage kit (``stages/kit.py``) builds it from what the stage fills in before the
artifact is committed, so a misspelt field fails the writer, not a reader far away;
readers use attributes. The store keeps each asset's current reference as JSON
(``to_json`` / ``ref_from_json``), never as a pickle.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Ref:
    """Where an artifact is and what made it."""

    stage: str
    fingerprint: str
    path: str
    reused: bool = False

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class PoolRef(Ref):
    n_records: int = 0
    num_shards: int = 0
    source: str = ""
    content_sha256: str = ""


@dataclass(frozen=True)
class WarmupSubsetRef(Ref):
    n_records: int = 0


@dataclass(frozen=True)
class CheckpointRef(Ref):
    # per checkpoint: index, step, mean_learning_rate, weight (sum 1), dir
    checkpoints: list[dict[str, Any]] = field(default_factory=list)
    model: dict[str, Any] = field(default_factory=dict)  # what identifies the base weights


@dataclass(frozen=True)
class TrainFeaturesRef(Ref):
    n_samples: int = 0
    shard: str = ""


@dataclass(frozen=True)
class ValidationFeaturesRef(Ref):
    n_samples: int = 0
    benchmark: str = ""
    content_sha256: str = ""


@dataclass(frozen=True)
class InfluenceRef(Ref):
    benchmark: str = ""
    n_train: int = 0
    benchmark_content_sha256: str | None = None
    validation: str = ""  # the validation features' fingerprint


@dataclass(frozen=True)
class VoteTableRef(Ref):
    benchmarks: list[str] = field(default_factory=list)
    n_samples: int = 0
    influence: dict[str, str] = field(default_factory=dict)  # benchmark -> influence fingerprint
    benchmark_content_sha256: dict[str, str | None] = field(default_factory=dict)


@dataclass(frozen=True)
class SubsetRef(Ref):
    n_selected: int = 0
    benchmarks: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class EmbeddingsRef(Ref):
    n_samples: int = 0
    shard: str = ""
    embedder: str = ""  # the embedding space's fingerprint
    dim: int = 0


@dataclass(frozen=True)
class PseudoLabelsRef(Ref):
    computed: bool = False  # False: a trained selector is imported, no labels were needed
    n_records: int = 0
    num_clusters: int = 0


@dataclass(frozen=True)
class SelectorRef(Ref):
    embedder: str = ""
    imported_from: str | None = None
    num_clusters: int = 0


@dataclass(frozen=True)
class OFASubsetRef(Ref):
    n_selected: int = 0
    method: str = "ofa"


@dataclass(frozen=True)
class VisualDependencyRef(Ref):
    n_records: int = 0
    n_scored: int = 0  # records with a score (not text-only, not skipped)
    checkpoint: int = 0  # the warm-up checkpoint's index the losses were computed at


@dataclass(frozen=True)
class EvaluationSubsetsRef(Ref):
    sizes: dict[str, int] = field(default_factory=dict)
    methods: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class AdapterRef(Ref):
    method: str = ""
    adapters: dict[str, str] = field(default_factory=dict)  # part (or the method) -> adapter folder
    n_records: dict[str, int] = field(default_factory=dict)
    steps: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class ScoresRef(Ref):
    method: str = ""
    scores: dict[str, float] = field(default_factory=dict)
    chance: dict[str, float | None] = field(default_factory=dict)
    n: dict[str, int] = field(default_factory=dict)
    collapsed: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class TableRef(Ref):
    rel: dict[str, float] = field(default_factory=dict)
    rel_all: dict[str, float] = field(default_factory=dict)
    rel_benchmarks: list[str] = field(default_factory=list)
    methods: list[str] = field(default_factory=list)
    # method -> {difference, low, high}: Rel. (and Rel. all) minus the random seeds' mean,
    # with its paired bootstrap 95% interval; empty without random-<seed> methods
    rel_vs_random: dict[str, dict[str, float]] = field(default_factory=dict)
    rel_all_vs_random: dict[str, dict[str, float]] = field(default_factory=dict)


#: Each stage's reference type, by stage (asset) name.
REF_TYPES: dict[str, type[Ref]] = {
    "training_pool": PoolRef,
    "warmup_subset": WarmupSubsetRef,
    "warmup_checkpoint": CheckpointRef,
    "training_gradients": TrainFeaturesRef,
    "validation_gradients": ValidationFeaturesRef,
    "task_influence": InfluenceRef,
    "vote_table": VoteTableRef,
    "selected_subset": SubsetRef,
    "ofa_embeddings": EmbeddingsRef,
    "ofa_pseudo_labels": PseudoLabelsRef,
    "ofa_selector": SelectorRef,
    "ofa_selected_subset": OFASubsetRef,
    "visual_dependency": VisualDependencyRef,
    "evaluation_subsets": EvaluationSubsetsRef,
    "finetuned_adapter": AdapterRef,
    "benchmark_scores": ScoresRef,
    "evaluation_table": TableRef,
}


def make_ref(stage: str, fingerprint: str, path: str, reused: bool, fields: dict[str, Any]) -> Ref:
    """The stage's reference; a field the type does not have is an error naming both."""
    kind = REF_TYPES.get(stage, Ref)
    known = {f.name for f in dataclasses.fields(kind)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise TypeError(f"{stage}: {kind.__name__} has no field(s) {unknown}; it has {sorted(known - {'stage', 'fingerprint', 'path', 'reused'})}")
    return kind(stage=stage, fingerprint=fingerprint, path=path, reused=reused, **fields)


def ref_from_json(document: dict[str, Any]) -> Ref:
    """A stored reference (JSON) as its stage's type."""
    base = {k: document[k] for k in ("stage", "fingerprint", "path")}
    rest = {k: v for k, v in document.items() if k not in base and k != "reused"}
    return make_ref(base["stage"], base["fingerprint"], base["path"], bool(document.get("reused", False)), rest)
