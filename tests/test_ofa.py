"""OFA core: k-means pseudo labels, the selector, confidence and least-confident selection."""

from __future__ import annotations

import json

import numpy as np
import pytest

from icons_dagster.core.selection import consensus
from icons_dagster.core.ofa.selector import (
    OFAConfig,
    SelectorMismatchError,
    assign_clusters,
    confidence_scores,
    kmeans,
    load_selector,
    select_least_confident,
    selector_probabilities,
    train_selector,
)


def _blobs(n_per: int, centers: np.ndarray, spread: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = np.concatenate([c + spread * rng.standard_normal((n_per, centers.shape[1])) for c in centers]).astype(np.float32)
    truth = np.repeat(np.arange(len(centers)), n_per)
    return x, truth


def _same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    """The two labelings split the rows identically (up to renaming clusters)."""
    pairs = set(zip(a.tolist(), b.tolist(), strict=True))
    return len(pairs) == len(set(a.tolist())) == len(set(b.tolist()))


def test_kmeans_hand_checked_one_dimensional():
    x = np.array([[0.0], [1.0], [10.0], [11.0]], dtype=np.float32)
    result = kmeans(x, 2, seed=0)
    assert sorted(result.centroids[:, 0].tolist()) == [0.5, 10.5]
    assert result.inertia == pytest.approx(4 * 0.25)
    assert _same_partition(result.labels, np.array([0, 0, 1, 1]))
    assert result.converged


def test_kmeans_recovers_separated_blobs_and_is_deterministic():
    centers = np.eye(8, dtype=np.float32)[:5] * 4.0
    x, truth = _blobs(60, centers, 0.3)
    first = kmeans(x, 5, seed=3)
    second = kmeans(x, 5, seed=3)
    assert _same_partition(first.labels, truth)
    assert first.labels.tobytes() == second.labels.tobytes()
    assert first.centroids.tobytes() == second.centroids.tobytes()
    # each centroid is the mean of its members (the Lloyd fixed point)
    for c in range(5):
        np.testing.assert_allclose(first.centroids[c], x[first.labels == c].mean(axis=0), atol=1e-5)


def test_kmeans_reads_float16_like_float32():
    centers = np.eye(6, dtype=np.float32)[:3] * 2.0
    x, _ = _blobs(40, centers, 0.2, seed=1)
    x16 = x.astype(np.float16)
    a = kmeans(x16, 3, seed=0)
    b = kmeans(x16.astype(np.float32), 3, seed=0)
    assert a.labels.tobytes() == b.labels.tobytes()


def test_kmeans_refills_an_empty_cluster_with_the_farthest_point():
    # 9 points at the origin and one far away; k=3 can only fill clusters by reseeding.
    x = np.zeros((10, 2), dtype=np.float32)
    x[9] = [5.0, 5.0]
    x[8] = [0.1, 0.0]
    result = kmeans(x, 3, seed=0)
    assert len(set(result.labels.tolist())) == 3
    assert result.inertia < 0.01


def test_kmeans_needs_k_rows():
    with pytest.raises(ValueError, match="at least k=5"):
        kmeans(np.zeros((3, 2), dtype=np.float32), 5)


def test_assign_ties_go_to_the_lowest_index():
    labels, dist = assign_clusters(np.array([[0.5]], dtype=np.float32), np.array([[0.0], [1.0]], dtype=np.float32))
    assert labels.tolist() == [0]
    assert dist.tolist() == [0.25]


def test_confidence_measures_hand_computed():
    probabilities = np.array([[0.5, 0.3, 0.2], [1.0, 0.0, 0.0]], dtype=np.float32)
    scores = confidence_scores(probabilities)
    np.testing.assert_allclose(scores["max_softmax"], [0.5, 1.0], rtol=1e-6)
    np.testing.assert_allclose(scores["margin"], [0.2, 1.0], rtol=1e-6)
    expected = 0.5 * np.log(0.5) + 0.3 * np.log(0.3) + 0.2 * np.log(0.2)
    np.testing.assert_allclose(scores["entropy"], [expected, 0.0], rtol=1e-6)


def test_least_confident_selection_and_tie_break():
    ids = [f"r{i}" for i in range(10)]
    confidence = np.array([0.9, 0.1, 0.5, 0.2, 0.2, 0.8, 0.3, 0.95, 0.6, 0.7])
    chosen = select_least_confident(ids, confidence, 0.3)  # floor(3) rows
    assert chosen.n_selected == 3
    picked = {ids[i] for i in np.flatnonzero(chosen.selected)}
    assert picked == {"r1", "r3", "r4"}
    # a tie at the cutoff is broken by sha256(id), as in the ICONS subset
    tied = np.array([0.1, 0.5, 0.5, 0.5, 0.9])
    tied_ids = ["a", "b", "c", "d", "e"]
    chosen = select_least_confident(tied_ids, tied, 0.4)
    hashes = consensus.id_hash(["b", "c", "d"])
    winner = ["b", "c", "d"][int(np.argmin(hashes))]
    assert {tied_ids[i] for i in np.flatnonzero(chosen.selected)} == {"a", winner}
    assert chosen.n_decided_by_tiebreak == 1


def _trained(tmp_path=None, seed: int = 0):
    centers = np.eye(16, dtype=np.float32)[:4] * 3.0
    x, truth = _blobs(80, centers, 0.5, seed=seed)
    config = OFAConfig(num_clusters=4, hidden_dim=32, epochs=3, min_steps=0, batch_size=32, learning_rate=1e-2, kmeans_init_sample=320)
    labels = kmeans(x, 4, seed=0).labels
    return x, truth, labels, config, train_selector(x, labels, config, "embedder-A")


def test_selector_learns_pseudo_labels_deterministically():
    x, truth, labels, config, selector = _trained()
    probabilities = selector_probabilities(selector, x)
    assert (probabilities.argmax(axis=1) == labels).mean() > 0.95
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
    again = train_selector(x, labels, config, "embedder-A")
    for (name, a), (_, b) in zip(selector.model.state_dict().items(), again.model.state_dict().items(), strict=True):
        assert a.numpy().tobytes() == b.numpy().tobytes(), name
    assert [h["epoch"] for h in selector.training["history"]] == [1, 2, 3]
    assert selector.training["steps"] == 3 * 10  # 320 records at batch 32


def test_a_small_pool_trains_whole_epochs_until_min_steps():
    x, _, labels, config, _ = _trained()
    from dataclasses import replace

    selector = train_selector(x, labels, replace(config, min_steps=35), "embedder-A")
    assert selector.training["epochs"] == 4 and selector.training["steps"] == 40  # ceil(35 / 10) epochs


def test_records_near_cluster_boundaries_are_least_confident():
    # overlapping blobs: the selector sees records on the boundaries while it trains
    centers = np.eye(16, dtype=np.float32)[:4] * 3.0
    x, _ = _blobs(100, centers, 1.0, seed=2)
    config = OFAConfig(num_clusters=4, hidden_dim=32, epochs=3, min_steps=0, batch_size=32, learning_rate=1e-2, kmeans_init_sample=400)
    clusters = kmeans(x, 4, seed=0)
    selector = train_selector(x, clusters.labels, config, "embedder-A")
    d = ((x[:, None, :] - clusters.centroids[None, :, :]) ** 2).sum(axis=2)
    d.sort(axis=1)
    gap = np.sqrt(d[:, 1]) - np.sqrt(d[:, 0])  # how much closer the nearest centroid is than the next
    boundary, core = gap <= np.quantile(gap, 0.25), gap >= np.quantile(gap, 0.75)
    scores = confidence_scores(selector_probabilities(selector, x))
    for measure in ("max_softmax", "margin", "entropy"):
        assert scores[measure][boundary].mean() < scores[measure][core].mean(), measure
    chosen = select_least_confident([f"r{i}" for i in range(len(x))], scores["max_softmax"], 0.25)
    assert gap[chosen.selected].mean() < gap[~chosen.selected].mean()


def test_selector_round_trip_and_refusals(tmp_path):
    x, _, _, _, selector = _trained()
    folder = tmp_path / "selector"
    selector.save(folder)
    config = json.loads((folder / "selector.json").read_text())
    assert config["embedder_fingerprint"] == "embedder-A" and config["num_clusters"] == 4
    loaded = load_selector(folder, expected_embedder_fingerprint="embedder-A")
    assert selector_probabilities(loaded, x).tobytes() == selector_probabilities(selector, x).tobytes()
    with pytest.raises(SelectorMismatchError, match="embedder-A.*embedder-B"):
        load_selector(folder, expected_embedder_fingerprint="embedder-B")
    with pytest.raises(SelectorMismatchError, match="16 dimensions"):
        selector_probabilities(loaded, np.zeros((2, 8), dtype=np.float32))
    (folder / "selector.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="selector.safetensors"):
        load_selector(folder)


def test_config_validation():
    with pytest.raises(ValueError, match="confidence"):
        OFAConfig(confidence="variance")
    with pytest.raises(ValueError, match="num_clusters"):
        OFAConfig(num_clusters=1)
