"""OFA: k-means pseudo labels, a small MLP selector, and least-confident selection.

The method (../shared/papers/ofa-once-for-all-selection.md): embed every record in a frozen
image-text space, cluster the embeddings (the clusters are pseudo labels), train a light
selector to predict the cluster of a record for a few epochs, and keep the records the
selector is least sure about. The selector is learned once and reused on other pools
without recomputation, so it is saved as a plain artifact: safetensors weights plus a JSON
config that names the embedder it was trained on (``embedder_fingerprint``); applying it
to embeddings from another embedder is refused.

Determinism: k-means++ seeding and every shuffle draw from numpy's PCG64 or a seeded torch
generator; assignments and updates run in fixed-size chunks in a fixed order, so the same
embeddings, config and thread count give byte-identical labels, weights and scores.

This module must not import dagster.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from icons_dagster.core.selection import consensus
from icons_dagster.core.config import _require, check_choices, setting

CONFIDENCE_MEASURES = ("max_softmax", "margin", "entropy")
SELECTOR_WEIGHTS = "selector.safetensors"
SELECTOR_CONFIG = "selector.json"
SELECTOR_FORMAT = 1


@dataclass(frozen=True)
class OFAConfig:
    """Clustering, selector training and selection settings."""

    num_clusters: int = setting(64, "k of the k-means pseudo labels", aliases=("--ofa-clusters",))
    kmeans_iterations: int = setting(50, "k-means iterations")
    kmeans_init_sample: int = setting(20_000, "k-means++ seeds from at most this many rows")
    kmeans_seed: int = setting(0, "k-means seed")
    hidden_dim: int = setting(256, "the selector MLP's hidden width")
    epochs: int = setting(3, '"a few epochs": the selector must not memorise the pool')
    # ...but a small pool gives few steps per epoch: epochs are added. 665K records at batch
    # 256 are 2,600 steps an epoch; 720 are 3.
    min_steps: int = setting(300, "train the selector at least this many steps")
    batch_size: int = setting(256, "selector batch size")
    learning_rate: float = setting(1e-3, "selector learning rate")
    weight_decay: float = setting(0.01, "selector weight decay")
    train_seed: int = setting(0, "selector initialisation and shuffle seed")
    confidence: str = setting("max_softmax", "how sure the selector is of a record", choices=CONFIDENCE_MEASURES)
    p: float = setting(0.2, "OFA selection ratio")
    # a trained selector folder (selector.json + selector.safetensors, e.g. another home's
    # exports/ofa_selector) reused instead of training one on this pool
    selector: str = setting("", "reuse a trained selector folder (e.g. another home's exports/ofa_selector); '' trains one", path=True)

    def __post_init__(self) -> None:
        _require(self.num_clusters >= 2, f"num_clusters must be >= 2, got {self.num_clusters}")
        _require(self.kmeans_iterations >= 1, f"kmeans_iterations must be >= 1, got {self.kmeans_iterations}")
        _require(self.kmeans_init_sample >= self.num_clusters, "kmeans_init_sample must be >= num_clusters")
        _require(self.hidden_dim >= 1 and self.batch_size >= 1, "hidden_dim and batch_size must be >= 1")
        _require(self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}")
        _require(self.min_steps >= 0, f"min_steps must be >= 0, got {self.min_steps}")
        _require(self.learning_rate > 0, f"learning_rate must be > 0, got {self.learning_rate}")
        check_choices(self)
        _require(0.0 < self.p <= 1.0, f"p must be in (0, 1], got {self.p}")

    def selector_source(self) -> Path | None:
        """The trained selector folder to reuse, or None to train one."""
        return Path(self.selector).expanduser().resolve() if self.selector else None

    def kmeans_fields(self) -> dict:
        """What the pseudo labels depend on: k and the k-means settings."""
        return {k: v for k, v in self.selector_fields().items() if k.startswith(("num_clusters", "kmeans"))}

    def subset_fields(self) -> dict:
        """What the subset depends on beyond the selector: the confidence measure and p."""
        return {"confidence": self.confidence, "p": self.p}

    def selector_fields(self) -> dict:
        """What the trained selector depends on (not p, the confidence measure, or where an
        imported selector comes from: its content enters the fingerprint instead)."""
        fields = asdict(self)
        for key in ("confidence", "p", "selector"):
            fields.pop(key)
        return fields


# -- k-means -------------------------------------------------------------------------------


def _row_chunks(n: int, chunk_rows: int) -> Iterator[slice]:
    for start in range(0, n, chunk_rows):
        yield slice(start, min(n, start + chunk_rows))


def _sq_distances(x: np.ndarray, centroids: np.ndarray, centroid_sq: np.ndarray) -> np.ndarray:
    """||x - c||^2 for every row and centroid, in float32 (clipped at 0)."""
    x = x.astype(np.float32, copy=False)
    d = (x * x).sum(axis=1, keepdims=True) - 2.0 * (x @ centroids.T) + centroid_sq[None, :]
    return np.maximum(d, 0.0, out=d)


def assign_clusters(x: np.ndarray, centroids: np.ndarray, chunk_rows: int = 65_536) -> tuple[np.ndarray, np.ndarray]:
    """(nearest centroid index [N] int32, its squared distance [N] float32); ties -> lowest index."""
    c = centroids.astype(np.float32)
    c_sq = (c * c).sum(axis=1)
    labels = np.empty(x.shape[0], dtype=np.int32)
    dist = np.empty(x.shape[0], dtype=np.float32)
    for rows in _row_chunks(x.shape[0], chunk_rows):
        d = _sq_distances(x[rows], c, c_sq)
        labels[rows] = d.argmin(axis=1)
        dist[rows] = d[np.arange(d.shape[0]), labels[rows]]
    return labels, dist


def kmeans_plus_plus(x: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """k-means++ seeding (Arthur & Vassilvitskii): each next seed drawn with prob. ~ D(x)^2."""
    n = x.shape[0]
    centroids = np.empty((k, x.shape[1]), dtype=np.float32)
    centroids[0] = x[rng.integers(n)]
    closest = _sq_distances(x, centroids[:1], (centroids[:1] ** 2).sum(axis=1))[:, 0].astype(np.float64)
    for j in range(1, k):
        total = closest.sum()
        if total <= 0.0:  # fewer distinct points than k: repeat one (it is reseeded later if empty)
            pick = int(rng.integers(n))
        else:
            pick = int(np.searchsorted(np.cumsum(closest), rng.random() * total, side="right"))
            pick = min(pick, n - 1)
        centroids[j] = x[pick]
        d = _sq_distances(x, centroids[j : j + 1], (centroids[j : j + 1] ** 2).sum(axis=1))[:, 0]
        np.minimum(closest, d, out=closest)
    return centroids


@dataclass(frozen=True)
class KMeansResult:
    centroids: np.ndarray  # [k, d] float32
    labels: np.ndarray  # [N] int32
    sq_distances: np.ndarray  # [N] float32: each row's squared distance to its centroid
    inertia: float  # sum of squared distances to the assigned centroid
    iterations: int
    converged: bool  # no assignment changed in the last iteration
    reseeded: int  # empty clusters refilled with the farthest point


def kmeans(
    x: np.ndarray,
    k: int,
    seed: int = 0,
    max_iterations: int = 50,
    init_sample: int = 20_000,
    chunk_rows: int = 65_536,
    progress: Callable[[int, int], None] | None = None,
) -> KMeansResult:
    """Lloyd's k-means with k-means++ seeding on a seeded sample; deterministic.

    ``x`` may be float16 (it is read chunk by chunk as float32). An empty cluster takes the
    point farthest from its centroid, so exactly ``k`` clusters come back when N >= k.
    """
    n = x.shape[0]
    _require(n >= k, f"k-means needs at least k={k} rows, got {n}")
    rng = np.random.Generator(np.random.PCG64(seed))
    sample = np.sort(rng.choice(n, size=min(n, init_sample), replace=False))
    centroids = kmeans_plus_plus(x[sample].astype(np.float32), k, rng)
    labels = np.full(n, -1, dtype=np.int32)
    reseeded = 0
    converged = False
    iteration = 0
    for iteration in range(1, max_iterations + 1):
        new_labels, dist = assign_clusters(x, centroids, chunk_rows)
        converged = bool(np.array_equal(new_labels, labels))
        labels = new_labels
        sums = np.zeros((k, x.shape[1]), dtype=np.float64)
        for rows in _row_chunks(n, chunk_rows):
            # one-hot matmul: a fixed summation order, unlike np.add.at on shuffled labels
            onehot = np.zeros((rows.stop - rows.start, k), dtype=np.float32)
            onehot[np.arange(onehot.shape[0]), labels[rows]] = 1.0
            sums += (onehot.T @ x[rows].astype(np.float32)).astype(np.float64)
        counts = np.bincount(labels, minlength=k)
        empty = np.flatnonzero(counts == 0)
        if len(empty):
            far = np.argsort(-dist, kind="stable")[: len(empty)]
            for cluster, row in zip(empty, far, strict=True):
                sums[cluster] = x[row].astype(np.float64)
                counts[cluster] = 1
                labels[row] = cluster
            reseeded += len(empty)
            converged = False
        centroids = (sums / counts[:, None]).astype(np.float32)
        if progress is not None:
            progress(iteration, max_iterations)
        if converged:
            break
    labels, dist = assign_clusters(x, centroids, chunk_rows)
    return KMeansResult(
        centroids=centroids,
        labels=labels,
        sq_distances=dist,
        inertia=float(dist.astype(np.float64).sum()),
        iterations=iteration,
        converged=converged,
        reseeded=reseeded,
    )


# -- the selector --------------------------------------------------------------------------


class SelectorMLP(torch.nn.Module):
    """embedding -> hidden (GELU) -> cluster logits."""

    def __init__(self, input_dim: int, hidden_dim: int, num_clusters: int) -> None:
        super().__init__()
        self.hidden = torch.nn.Linear(input_dim, hidden_dim)
        self.out = torch.nn.Linear(hidden_dim, num_clusters)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.nn.functional.gelu(self.hidden(x)))


@dataclass
class TrainedSelector:
    model: SelectorMLP
    input_dim: int
    num_clusters: int
    hidden_dim: int
    embedder_fingerprint: str
    training: dict  # config, per-epoch loss and accuracy, pool identity: what a reuser reads

    def save(self, directory: Path) -> None:
        from safetensors.torch import save_file

        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in self.model.state_dict().items()}
        save_file(state, str(directory / SELECTOR_WEIGHTS), metadata={"format": str(SELECTOR_FORMAT)})
        config = {
            "format": SELECTOR_FORMAT,
            "architecture": "mlp-gelu",
            "input_dim": self.input_dim,
            "hidden_dim": self.hidden_dim,
            "num_clusters": self.num_clusters,
            "embedder_fingerprint": self.embedder_fingerprint,
            "training": self.training,
        }
        (directory / SELECTOR_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


class SelectorMismatchError(ValueError):
    """A saved selector does not fit the embeddings it is asked to score."""


def load_selector(directory: str | Path, expected_embedder_fingerprint: str | None = None) -> TrainedSelector:
    """A saved selector (safetensors + JSON, never pickle); refuses another embedder's selector."""
    from safetensors.torch import load_file

    directory = Path(directory)
    config_path = directory / SELECTOR_CONFIG
    weights_path = directory / SELECTOR_WEIGHTS
    for path in (config_path, weights_path):
        if not path.is_file():
            raise FileNotFoundError(f"{path}: not found (a selector folder holds {SELECTOR_CONFIG} and {SELECTOR_WEIGHTS})")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{config_path}: malformed JSON ({error})") from error
    if config.get("format") != SELECTOR_FORMAT or config.get("architecture") != "mlp-gelu":
        raise ValueError(f"{config_path}: unsupported selector format {config.get('format')!r} / {config.get('architecture')!r}")
    found = config.get("embedder_fingerprint")
    if expected_embedder_fingerprint is not None and found != expected_embedder_fingerprint:
        raise SelectorMismatchError(
            f"{config_path}: the selector was trained on embedder {found}, but this pool is embedded with "
            f"{expected_embedder_fingerprint}; embed with the selector's embedder or train a new selector"
        )
    model = SelectorMLP(int(config["input_dim"]), int(config["hidden_dim"]), int(config["num_clusters"]))
    try:
        model.load_state_dict(load_file(str(weights_path)))
    except (RuntimeError, KeyError) as error:
        raise ValueError(f"{weights_path}: weights do not match {config_path} ({error})") from error
    model.eval()
    return TrainedSelector(
        model=model,
        input_dim=int(config["input_dim"]),
        num_clusters=int(config["num_clusters"]),
        hidden_dim=int(config["hidden_dim"]),
        embedder_fingerprint=found,
        training=config.get("training", {}),
    )


def train_selector(
    embeddings: np.ndarray,
    labels: np.ndarray,
    config: OFAConfig,
    embedder_fingerprint: str,
    progress: Callable[[int, int, float], None] | None = None,
) -> TrainedSelector:
    """Cross-entropy on the pseudo labels (AdamW, seeded) for ``config.epochs`` epochs, or
    more whole epochs when that is fewer than ``config.min_steps`` optimizer steps."""
    n, dim = embeddings.shape
    _require(n == labels.shape[0], f"{n} embeddings but {labels.shape[0]} labels")
    _require(n > 0, "no embeddings to train the selector on")
    k = int(config.num_clusters)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.train_seed)
        model = SelectorMLP(dim, config.hidden_dim, k)
    generator = torch.Generator().manual_seed(config.train_seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    x_all = torch.from_numpy(np.ascontiguousarray(embeddings))
    y_all = torch.from_numpy(labels.astype(np.int64))
    steps_per_epoch = math.ceil(n / config.batch_size)
    epochs = max(config.epochs, math.ceil(config.min_steps / steps_per_epoch))
    history = []
    model.train()
    for epoch in range(epochs):
        order = torch.randperm(n, generator=generator)
        total_loss, correct = 0.0, 0
        for step in range(steps_per_epoch):
            rows = order[step * config.batch_size : (step + 1) * config.batch_size]
            x = x_all[rows].float()
            y = y_all[rows]
            logits = model(x)
            loss = torch.nn.functional.cross_entropy(logits, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total_loss += float(loss.detach()) * len(rows)
            correct += int((logits.detach().argmax(dim=1) == y).sum())
        history.append({"epoch": epoch + 1, "loss": total_loss / n, "accuracy": correct / n})
        if progress is not None:
            progress(epoch + 1, epochs, total_loss / n)
    model.eval()
    return TrainedSelector(
        model=model,
        input_dim=dim,
        num_clusters=k,
        hidden_dim=config.hidden_dim,
        embedder_fingerprint=embedder_fingerprint,
        training={"config": config.selector_fields(), "n_train": n, "epochs": epochs, "steps": epochs * steps_per_epoch, "history": history},
    )


# -- confidence and selection --------------------------------------------------------------


def selector_probabilities(selector: TrainedSelector, embeddings: np.ndarray, chunk_rows: int = 65_536) -> np.ndarray:
    """Softmax over clusters [N, k] float32, computed in chunks."""
    if embeddings.ndim != 2 or embeddings.shape[1] != selector.input_dim:
        raise SelectorMismatchError(
            f"embeddings have shape {embeddings.shape}, the selector expects {selector.input_dim} dimensions"
        )
    out = np.empty((embeddings.shape[0], selector.num_clusters), dtype=np.float32)
    with torch.no_grad():
        for rows in _row_chunks(embeddings.shape[0], chunk_rows):
            x = torch.from_numpy(np.ascontiguousarray(embeddings[rows])).float()
            out[rows] = torch.softmax(selector.model(x), dim=1).numpy()
    return out


def confidence_scores(probabilities: np.ndarray) -> dict[str, np.ndarray]:
    """Every confidence measure (higher = more confident), float64 [N] each.

    max_softmax: p1; margin: p1 - p2; entropy: the negated entropy -H(p) = sum p log p.
    """
    p = probabilities.astype(np.float64)
    top2 = -np.partition(-p, 1, axis=1)[:, :2] if p.shape[1] >= 2 else np.concatenate([p, np.zeros_like(p)], axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        plogp = np.where(p > 0, p * np.log(p), 0.0)
    return {"max_softmax": top2[:, 0], "margin": top2[:, 0] - top2[:, 1], "entropy": plogp.sum(axis=1)}


def select_least_confident(ids: list[str], confidence: np.ndarray, p: float) -> consensus.Selection:
    """The floor(pN) least-confident rows; ties by sha256(id), then id (as the ICONS subset).

    Implemented as the consensus ``select`` on the single score column -confidence, so both
    selectors share one documented, deterministic order.
    """
    return consensus.select(ids, (-np.asarray(confidence, dtype=np.float64)).reshape(-1, 1), p, method="mean")
