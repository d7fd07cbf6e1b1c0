"""The ``ofa`` asset group end to end: embeddings, pseudo labels, selector, subset; reuse on another pool."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from icons_dagster.core.selection.consensus import subset_size
from icons_dagster.core.ofa.embedding import EmbedderConfig
from icons_dagster.core.ofa.selector import OFAConfig, SelectorMismatchError, load_selector
from icons_dagster.core.stages.ofa import stage_ofa_selector
from icons_dagster.core.storage.artifacts import ArtifactStore
from icons_dagster.demo.data import generate_demo
from icons_dagster.runner import run_graph
from graph_helpers import check_status, demo_config, latest_metadata, sha, temp_instance

OFA_ONLY = ("ofa",)


@pytest.fixture(scope="module")
def no_benchmarks(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("no_benchmarks")


@pytest.fixture(scope="module")
def trained(demo_paths, no_benchmarks, tmp_path_factory):
    home = tmp_path_factory.mktemp("ofa_home")
    instance = temp_instance(home)
    summary = run_graph(home, demo_config(demo_paths, no_benchmarks), instance=instance, methods=OFA_ONLY)
    return home, instance, summary


def test_ofa_subset_is_the_least_confident_fraction(trained, demo_records):
    home, instance, summary = trained
    records = json.loads(Path(summary["ofa_subset_json"]).read_text())
    scores = pl.read_parquet(summary["ofa_subset_parquet"])
    n = len(demo_records)
    assert scores.height == n
    assert len(records) == subset_size(n, 0.2)
    selected = scores.filter(pl.col("selected"))
    assert sorted(r["id"] for r in records) == sorted(selected["id"].to_list())
    # everyone in is at most as confident as everyone out
    assert selected["confidence"].max() <= scores.filter(~pl.col("selected"))["confidence"].min()
    assert scores["confidence"].to_list() == scores["confidence_max_softmax"].to_list()
    # the records are the pool's own, untouched
    pool = {json.loads(r.raw_json)["id"]: json.loads(r.raw_json) for r in demo_records}
    assert all(pool[r["id"]] == r for r in records)
    metadata = latest_metadata(instance, "ofa_selected_subset")
    assert metadata["n_selected"] == len(records)
    assert check_status(instance, "ofa_selected_subset", "subset_size") == "SUCCEEDED"
    assert check_status(instance, "ofa_embeddings", "embeddings_finite_unit_norm") == "SUCCEEDED"
    assert metadata["confidence_measure"] == "max_softmax"


def test_pseudo_labels_follow_the_demo_families(trained):
    home, instance, _ = trained
    metadata = latest_metadata(instance, "ofa_pseudo_labels")
    assert metadata["num_clusters"] == 12
    # the embedder separates task families: most clusters are dominated by one family
    assert metadata["cluster_family_purity"] > 0.6
    selector_metadata = latest_metadata(instance, "ofa_selector")
    assert selector_metadata["imported"] is False
    assert selector_metadata["final_accuracy"] > 0.9
    assert latest_metadata(instance, "ofa_selected_subset")["clusters_predicted"] == "12 of 12"


def test_embeddings_are_unit_norm_and_cover_every_shard(trained, demo_records):
    home, _, _ = trained
    total = 0
    for ref_file in sorted((home / "refs" / "ofa_embeddings").glob("*.json")):
        folder = home / json.loads(ref_file.read_text())["path"]
        block = np.load(folder / "embeddings.npy", allow_pickle=False)
        assert block.dtype == np.float16
        np.testing.assert_allclose(np.linalg.norm(block.astype(np.float32), axis=1), 1.0, atol=2e-3)
        total += block.shape[0]
    assert total == len(demo_records)


def test_same_inputs_give_byte_identical_selector_and_subset(trained, demo_paths, no_benchmarks, tmp_path):
    _, _, first = trained
    second = run_graph(tmp_path, demo_config(demo_paths, no_benchmarks), instance=temp_instance(tmp_path), methods=OFA_ONLY)
    for key in ("ofa_subset_json", "ofa_subset_parquet"):
        assert sha(second[key]) == sha(first[key])
    for name in ("selector.safetensors", "selector.json"):
        assert sha(Path(second["ofa_selector"]) / name) == sha(Path(first["ofa_selector"]) / name)


def test_trained_selector_selects_on_another_pool_without_retraining(trained, no_benchmarks, tmp_path):
    _, _, first = trained
    other = generate_demo(tmp_path / "other_demo", size="test", seed=7)  # a different pool
    home = tmp_path / "home"
    instance = temp_instance(home)
    config = demo_config(other, no_benchmarks, ofa={"selector": first["ofa_selector"]})
    summary = run_graph(home, config, instance=instance, methods=OFA_ONLY)
    assert latest_metadata(instance, "ofa_pseudo_labels")["computed"] is False
    selector_metadata = latest_metadata(instance, "ofa_selector")
    assert selector_metadata["imported"] is True
    for name in ("selector.safetensors", "selector.json"):
        assert sha(Path(summary["ofa_selector"]) / name) == sha(Path(first["ofa_selector"]) / name)
    scores = pl.read_parquet(summary["ofa_subset_parquet"])
    assert ArtifactStore(home).read_ref("training_pool").content_sha256 != ArtifactStore(trained[0]).read_ref("training_pool").content_sha256
    assert scores.filter(pl.col("selected")).height == subset_size(scores.height, 0.2)
    assert latest_metadata(instance, "ofa_selected_subset")["selector_imported_from"] == first["ofa_selector"]


def test_a_selector_from_another_embedder_is_refused(trained, tmp_path):
    home, _, first = trained
    store = ArtifactStore(home)
    embeddings = {key.stem: store.read_ref("ofa_embeddings", key.stem) for key in (home / "refs" / "ofa_embeddings").glob("*.json")}
    other_space = EmbedderConfig(text="instruction")  # another embedding of the text: another space
    with pytest.raises(SelectorMismatchError, match="trained on embedder"):
        stage_ofa_selector(store, embeddings, store.read_ref("ofa_pseudo_labels"), OFAConfig(num_clusters=12), other_space, Path(first["ofa_selector"]))
    # the exported selector itself loads, names its embedder and says what it was trained on
    selector = load_selector(first["ofa_selector"])
    assert selector.num_clusters == 12
    assert selector.training["pool_records"] == sum(store.read_ref("ofa_embeddings", k).n_samples for k in embeddings)


def test_a_clip_checkpoint_folder_embeds_through_the_graph(demo_paths, demo_records, no_benchmarks, tmp_path):
    from icons_dagster.core.ofa.embedding import embedding_text
    from icons_dagster.demo.tiny_clip import build_tiny_clip

    clip = build_tiny_clip(tmp_path / "tiny-clip", [embedding_text(r, "conversation") for r in demo_records], seed=0)
    home = tmp_path / "home"
    config = demo_config(
        demo_paths, no_benchmarks, embedder={"kind": "clip", "name_or_path": str(clip), "image_weight": 0.5}, ofa={"num_clusters": 6}
    )
    summary = run_graph(home, config, instance=temp_instance(home), methods=OFA_ONLY)
    refs = [ArtifactStore(home).read_ref("ofa_embeddings", f.stem) for f in sorted((home / "refs" / "ofa_embeddings").glob("*.json"))]
    assert {ref.dim for ref in refs} == {2 * 16}  # image and text projections of the tiny CLIP
    assert sum(ref.n_samples for ref in refs) == len(demo_records)
    assert len(json.loads(Path(summary["ofa_subset_json"]).read_text())) == subset_size(len(demo_records), 0.2)
    assert load_selector(summary["ofa_selector"]).input_dim == 32
