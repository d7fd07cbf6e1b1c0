"""The command line: validate reports every problem; demo runs the graph and says where the subset is."""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image

from demo_pin import PIN_FILE, demo_outputs
from icons_dagster.cli import main
from icons_dagster.core.storage.artifacts import ArtifactStore
from icons_dagster.resources.home import read_home_config

PIN_TOLERANCE = 1e-6


def write_pool(folder: Path) -> Path:
    (folder / "images").mkdir(parents=True)
    Image.new("RGB", (8, 8), "red").save(folder / "images" / "a.png")
    records = [
        {"id": "ok", "image": "a.png", "conversations": [{"from": "human", "value": "<image>\\nQ?"}, {"from": "gpt", "value": "A"}]},
        {"id": "escape", "image": "../secret.png", "conversations": [{"from": "human", "value": "<image>\\nQ?"}, {"from": "gpt", "value": "A"}]},
        {"id": "noanswer", "conversations": [{"from": "human", "value": "Q?"}]},
        {"id": "ok", "conversations": [{"from": "human", "value": "Q?"}, {"from": "gpt", "value": "A"}]},
    ]
    path = folder / "pool.json"
    path.write_text(json.dumps(records))
    return path


def test_validate_lists_every_problem_by_id_and_reason(tmp_path, capsys):
    pool = write_pool(tmp_path)
    code = main(["--home", str(tmp_path / "home"), "validate", "--pool", str(pool), "--image-root", str(tmp_path / "images")])
    out = capsys.readouterr().out
    assert code == 1
    assert "1 valid, 3 invalid" in out
    assert "(id 'escape'): image path escapes the image root" in out
    assert "(id 'noanswer')" in out and "(id 'ok')" in out and "duplicate" in out
    assert "p=0.2 of n=1 selects nothing" in out and "4 problem(s) found" in out  # the default p leaves nothing of one record


def _image_pool(folder: Path) -> Path:
    """A pool whose images are every kind of bad the run would otherwise meet only while computing gradients."""
    images = folder / "images"
    images.mkdir(parents=True)
    Image.new("RGB", (8, 8), "red").save(images / "ok.png")
    Image.new("RGB", (16, 16), "blue").save(images / "big.png")
    (images / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg" * 4)
    (images / "empty.png").write_bytes(b"")
    Image.new("RGB", (64, 64), "green").save(images / "full.png")
    (images / "truncated.png").write_bytes((images / "full.png").read_bytes()[:60])
    Image.new("1", (9000, 5000)).save(images / "bomb.png")  # 45M pixels in a few kB: refused before decoding
    turns = [{"from": "human", "value": "<image>\nQ?"}, {"from": "gpt", "value": "A"}]
    names = ("ok", "big", "corrupt", "empty", "truncated", "bomb")
    suffix = {"corrupt": "jpg"}
    records = [{"id": n, "image": f"{n}.{suffix.get(n, 'png')}", "conversations": turns} for n in names]
    (folder / "pool.json").write_text(json.dumps(records))
    return folder / "pool.json"


def test_validate_decodes_every_image_with_a_pixel_limit_and_checks_p(tmp_path, capsys):
    pool = _image_pool(tmp_path)
    args = ["--home", str(tmp_path / "home"), "validate", "--pool", str(pool), "--image-root", str(tmp_path / "images")]
    for workers in ("1", "2"):  # in this process, and in worker processes: the same report
        assert main([*args, "--workers", workers, "--p", "0.5"]) == 1
        out = capsys.readouterr().out
        assert "2 valid, 4 invalid" in out, out
        assert "(id 'corrupt'): cannot load image" in out and "(id 'empty'): cannot load image" in out
        assert "(id 'truncated'): cannot load image" in out and "(id 'ok')" not in out
        assert "(id 'bomb'): image " in out and "9000x5000 = 45,000,000 pixels, above the limit of 40,000,000" in out
        assert "p = 0.5 selects 1 of its 2 valid records" in out and "4 problem(s) found" in out
    # A limit of 100 pixels refuses the 16x16 image too; p = 0.2 of what is left selects nothing.
    assert main([*args, "--max-image-pixels", "100", "--p", "0.2"]) == 1
    out = capsys.readouterr().out
    assert "1 valid, 5 invalid" in out and "(id 'big'): image " in out and "16x16 = 256 pixels, above the limit of 100" in out
    assert "[pool] ERROR selection.p: p=0.2 of n=1 selects nothing" in out and "6 problem(s) found" in out


def test_the_pool_stage_screens_headers_with_the_configured_limit(tmp_path):
    from icons_dagster.core.config import DEFAULT_MAX_IMAGE_PIXELS
    from icons_dagster.core.stages.icons import stage_pool
    from icons_dagster.core.storage.artifacts import ArtifactStore

    pool = _image_pool(tmp_path)
    store = ArtifactStore(tmp_path / "store")
    default = stage_pool(store, pool, tmp_path / "images", 1)
    skipped = {s["id"]: s["reason"] for s in default.metadata["skipped"]}
    # The header check refuses the empty, corrupt and oversized files; a truncated body decodes
    # only in validate (or is skipped, counted, when the gradients decode it).
    assert sorted(skipped) == ["bomb", "corrupt", "empty"] and default.ref.n_records == 3
    small = stage_pool(store, pool, tmp_path / "images", 1, max_image_pixels=100)
    reasons = {s["id"]: s["reason"] for s in small.metadata["skipped"]}
    assert small.ref.n_records == 1 and "16x16 = 256 pixels, above the limit of 100" in reasons["big"] and "64x64" in reasons["truncated"]
    assert small.ref.fingerprint != default.ref.fingerprint
    assert stage_pool(store, pool, tmp_path / "images", 1, max_image_pixels=DEFAULT_MAX_IMAGE_PIXELS).ref.fingerprint == default.ref.fingerprint


def test_validate_clean_benchmarks_folder(demo_paths, capsys):
    code = main(["validate", "--benchmarks", str(demo_paths.benchmarks)])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "[yes_no/val]" in out and "[yes_no/test]" in out and "0 problem(s) found" in out


def test_demo_command_runs_the_graph_on_a_persistent_home(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "unused"))
    monkeypatch.setenv("ICONS_HOME", str(tmp_path / "unused"))
    home = tmp_path / "home"
    assert main(["--home", str(home), "demo", "--size", "test"]) == 0
    out = capsys.readouterr().out
    subset_path = home / "exports" / "selected_subset.json"
    assert f"ICONS subset (LLaVA JSON): {subset_path}" in out
    assert len(json.loads(subset_path.read_text())) == 33  # floor(0.2 * 168)
    ofa_subset = home / "exports" / "ofa_selected_subset.json"
    assert f"OFA subset (LLaVA JSON): {ofa_subset}" in out
    assert len(json.loads(ofa_subset.read_text())) == 33
    assert (home / "exports" / "ofa_selector" / "selector.safetensors").is_file()
    assert read_home_config(home).data.pool == str(home / "demo" / "data-test" / "pool.json")  # the demo is plain config
    assert (home / "dagster" / "dagster.yaml").is_file()
    assert any((home / "dagster").rglob("*.db"))  # runs recorded in the home's instance
    assert_matches_pin(demo_outputs(home))

    # Why is a sample in? Its votes and rank agree with the Parquet table of every sample.
    import polars as pl

    table = pl.read_parquet(home / "exports" / "selected_subset.parquet")
    first = table.row(0, named=True)
    assert main(["--home", str(home), "explain", first["id"]]) == 0
    out = capsys.readouterr().out
    assert f"**{first['id']}**: selected ({first['reason']}), rank 1 of 168" in out
    # Every record says why it is in or out; the reserved ones are the coverage reserve's count.
    reasons = dict(zip(table["id"], table["reason"], strict=True))
    assert all(reasons[r["id"]].startswith(("coverage:", "vote:") if r["selected"] else "out:") for r in table.iter_rows(named=True))
    manifest = json.loads((home / ArtifactStore(home).read_ref("selected_subset").path / "_COMPLETE.json").read_text())
    assert sum(v.startswith("coverage:") for v in reasons.values()) == manifest["metadata"]["n_reserved"] > 0
    assert f"{first['votes']} vote(s)" in out
    assert out.count("| yes |") == first["votes"]
    assert main(["--home", str(home), "explain", "no-such-id"]) == 2


def assert_matches_pin(outputs: dict) -> None:
    """Same subsets in the same order, same votes, influence and confidence within 1e-6."""
    pinned = json.loads(PIN_FILE.read_text(encoding="utf-8"))
    for key in ("icons_selected_in_rank_order", "ids", "votes", "ofa_selected_in_rank_order"):
        assert outputs[key] == pinned[key], key
    assert sorted(outputs["influence"]) == sorted(pinned["influence"])
    for name, values in pinned["influence"].items():
        assert max(abs(a - b) for a, b in zip(outputs["influence"][name], values, strict=True)) < PIN_TOLERANCE, name
    assert max(abs(a - b) for a, b in zip(outputs["ofa_confidence"], pinned["ofa_confidence"], strict=True)) < PIN_TOLERANCE


def test_run_command_on_a_given_pool_and_benchmarks(demo_paths, tiny_model_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "unused"))
    monkeypatch.setenv("ICONS_HOME", str(tmp_path / "unused"))
    benchmarks = tmp_path / "benchmarks"
    (benchmarks / "counting").mkdir(parents=True)
    # A benchmark without its own images/ resolves against the shared image root.
    (benchmarks / "counting" / "val.json").write_text(
        json.dumps(
            [
                {"id": f"v{i}", "image": r["image"], "conversations": r["conversations"]}
                for i, r in enumerate(r for r in json.loads(demo_paths.pool.read_text()) if r["family"] == "counting")
            ][:4]
        )
    )
    home = tmp_path / "home"
    args = ["--home", str(home), "run", "--pool", str(demo_paths.pool), "--image-root", str(demo_paths.image_root)]
    args += ["--benchmarks", str(benchmarks), "--p", "0.1", "--lora-r", "4", "--lora-alpha", "8", "--projection-dim", "64"]
    args += ["--max-length", "256", "--warmup-ratio", "0.1"]
    assert main(args) == 2  # no model: refused before anything runs
    assert "--model is required" in capsys.readouterr().err
    assert main([*args, "--model", str(tiny_model_dir)]) == 0, capsys.readouterr().err
    subset = json.loads((home / "exports" / "selected_subset.json").read_text())
    assert len(subset) == 16  # floor(0.1 * 168)
    saved = read_home_config(home)
    assert saved.lora.r == 4 and saved.selection.p == 0.1
    assert saved.data.pool == str(demo_paths.pool.resolve())


def test_run_ofa_alone_reuses_a_trained_selector_without_benchmarks(demo_paths, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "unused"))
    monkeypatch.setenv("ICONS_HOME", str(tmp_path / "unused"))
    first, second = tmp_path / "first", tmp_path / "second"
    pool = ["--pool", str(demo_paths.pool), "--image-root", str(demo_paths.image_root), "--method", "ofa", "--ofa-clusters", "8"]
    assert main(["--home", str(first), "run", *pool]) == 0, capsys.readouterr().err
    selector = first / "exports" / "ofa_selector"
    assert main(["--home", str(second), "run", *pool, "--ofa-selector", str(selector), "--ofa-p", "0.1"]) == 0
    out = capsys.readouterr().out
    assert "ICONS subset" not in out
    subset = json.loads((second / "exports" / "ofa_selected_subset.json").read_text())
    assert len(subset) == 16  # floor(0.1 * 168)
    assert read_home_config(second).ofa.selector == str(selector.resolve())
    assert not (second / "artifacts" / "warmup_checkpoint").exists()  # ICONS did not run
    assert main(["--home", str(tmp_path / "third"), "run", "--pool", str(demo_paths.pool)]) == 2  # ICONS needs benchmarks


def test_run_errors_are_one_line_with_a_hint(demo_paths, tiny_model_dir, tmp_path, monkeypatch, capsys):
    """A malformed pool, and a p that selects nothing of what survives (caught right after the
    pool, before any gradient): one line naming the cause, a hint, no traceback."""
    from graph_helpers import demo_config
    from icons_dagster.resources.home import write_home_config

    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "unused"))
    monkeypatch.setenv("ICONS_HOME", str(tmp_path / "unused"))
    home = tmp_path / "home"
    write_home_config(home, demo_config(demo_paths, demo_paths.benchmarks))
    bad = tmp_path / "bad.json"
    bad.write_text('[{"id": "a", "conversations": [')
    assert main(["--home", str(home), "run", "--pool", str(bad)]) == 1
    err = capsys.readouterr().err
    lines = err.split("\n")[-3:]  # after the progress bar: the cause, the hint
    assert lines[0] == f"run: step training_pool + warmup_subset + warmup_checkpoint failed: {bad}: malformed JSON at line 1, column 32: Expecting value", err
    assert lines[1].startswith("  hint: icons-dagster validate") and lines[2] == "" and "Traceback" not in err, err

    assert main(["--home", str(home), "run", "--pool", str(demo_paths.pool), "--p", "0.001"]) == 1
    err = capsys.readouterr().err
    assert "run: selection.p: p=0.001 of n=168 selects nothing (floor(p*n) = 0): raise --p; the pool has 168 valid records" in err, err
    assert "hint: raise --p" in err and "Traceback" not in err
    assert not (home / "artifacts" / "training_gradients").exists()  # stopped before any gradient


def test_explain_job_with_an_unknown_id_fails_with_a_description(tmp_path):
    from dagster import DagsterInstance

    from icons_dagster.registration import explain_sample_job
    from icons_dagster.resources import StoreResource

    result = explain_sample_job.execute_in_process(
        run_config={"ops": {"explain_selection": {"config": {"sample_id": "nope"}}}},
        resources={"store": StoreResource(root=str(tmp_path))}, instance=DagsterInstance.ephemeral(), raise_on_error=False,
    )
    assert not result.success
    (failure,) = [e for e in result.all_events if e.is_step_failure]
    assert failure.step_failure_data.user_failure_data.label == "intentional-failure"
    assert failure.step_failure_data.error.cls_name == "Failure"
    assert "selected_subset has not been materialized yet" in failure.step_failure_data.user_failure_data.description
