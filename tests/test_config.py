"""The configuration spine: one dataclass per section is the schema of icons.json, the
resources and the CLI's flags; a setting declared there reaches every consumer by its name."""

from __future__ import annotations

import dataclasses
import json

import pytest

from icons_dagster.cli import RUN_SECTIONS, build_parser, section_overrides
from icons_dagster.core.config import SelectionConfig, field_default
from icons_dagster.core.schema import SECTIONS, IconsConfig, default_json, section_to_json
from icons_dagster.resources import ASSET_SECTIONS, SECTION_RESOURCES
from icons_dagster.resources.home import read_home_config, write_home_config


def test_every_setting_has_help_and_a_json_default():
    for name, section in SECTIONS.items():
        for f in dataclasses.fields(section):
            assert f.metadata.get("help"), f"{name}.{f.name} has no help text"
        assert json.loads(json.dumps(default_json(section))) == default_json(section)


def test_resources_carry_the_section_fields_and_convert_without_renaming():
    assert set(SECTION_RESOURCES) == set(ASSET_SECTIONS) <= set(SECTIONS)
    for name, resource in SECTION_RESOURCES.items():
        section = SECTIONS[name]
        assert list(resource.model_fields) == [f.name for f in dataclasses.fields(section)], name
        assert resource().config() == section(), name  # the same defaults
        for f in dataclasses.fields(section):
            assert resource.model_fields[f.name].description == f.metadata["help"]
    chosen = SECTION_RESOURCES["selection"](p=0.3, method="mean", task_weights={"b": 2.0, "a": 0.5}).config()
    assert chosen == SelectionConfig(p=0.3, method="mean", task_weights=(("a", 0.5), ("b", 2.0)))


def test_the_json_form_round_trips_and_names_what_is_wrong():
    config = IconsConfig().replace(selection={"p": 0.3, "task_weights": {"vqa": 2}}, warmup={"adam_betas": [0.8, 0.99]}, data={"num_shards": 7})
    document = json.loads(json.dumps(config.to_json()))
    assert document["selection"]["task_weights"] == {"vqa": 2.0} and document["data"]["num_shards"] == 7
    assert IconsConfig.from_json(document) == config
    assert config.warmup.adam_betas == (0.8, 0.99)
    with pytest.raises(ValueError, match=r"icons\.json: unknown sections \['setings'\]"):
        IconsConfig.from_json({"setings": {}}, "icons.json")
    with pytest.raises(ValueError, match=r"icons\.json: gradients: unknown settings \['projection_dim'\]"):
        IconsConfig.from_json({"gradients": {"projection_dim": 8}}, "icons.json")
    with pytest.raises(ValueError, match=r"selection: .*p must be in \(0, 1\]"):
        IconsConfig.from_json({"selection": {"p": 2.0}}, "icons.json")
    with pytest.raises(ValueError, match="unknown value 'median'"):
        IconsConfig().replace(selection={"method": "median"})


def test_every_field_of_the_run_sections_is_a_flag_landing_under_its_own_name():
    parser = build_parser()
    for section in RUN_SECTIONS:
        for f in dataclasses.fields(SECTIONS[section]):
            value = field_default(f)
            flag = f.metadata.get("flag") or f"--{section}-{f.name}".replace("_", "-")
            if isinstance(value, bool):
                argv = [flag if not value else f"--no-{flag[2:]}"]
                expected = not value
            elif isinstance(value, (tuple, dict)) or value is None or f.name == "shard_executor":
                continue  # JSON-valued flags: checked below
            else:
                expected = value if not isinstance(value, str) or f.metadata.get("choices") else "x"
                if f.metadata.get("path"):
                    continue  # made absolute: checked below
                argv = [flag, str(expected)]
            args = parser.parse_args(["run", *argv])
            assert section_overrides(args) == {section: {f.name: expected}}, (section, f.name)


def test_short_flags_and_json_and_path_values(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = build_parser().parse_args(
        ["run", "--pool", "pool.json", "--p", "0.1", "--projection-dim", "64", "--lora-r", "4", "--shards", "8",
         "--selection-task-weights", '{"vqa": 3}', "--no-deterministic", "--ofa-clusters", "5"]
    )
    overrides = section_overrides(args)
    assert overrides == {
        "data": {"pool": str(tmp_path / "pool.json"), "num_shards": 8},
        "selection": {"p": 0.1, "task_weights": {"vqa": 3}},
        "gradients": {"dim": 64},
        "lora": {"r": 4},
        "model": {"deterministic": False},
        "ofa": {"num_clusters": 5},
    }
    config = IconsConfig().replace(**overrides)
    assert config.selection.task_weights == (("vqa", 3.0),) and config.data.num_shards == 8
    evaluate = build_parser().parse_args(["evaluate", "--methods", "full,ofa", "--epochs", "2"])
    assert IconsConfig().replace(**section_overrides(evaluate)).evaluation.methods == ("full", "ofa")
    assert IconsConfig().replace(evaluation={"methods": ["all"]}).evaluation.methods == ()


def test_a_home_written_by_the_old_layout_is_read_and_rewritten(tmp_path):
    old = {
        "data": {"pool": "/data/pool.json", "benchmarks": "/data/b", "demo_size": "test"},
        "model": {"name_or_path": "org/m", "lora_r": 16, "lora_alpha": 32, "demo_stage1_steps": 200},
        "settings": {"projection_dim": 1024, "aggregation": "mean", "p": 0.1, "warmup_ratio": 0.2, "write_influence_matrix": True},
        "ofa": {"embedder": "clip", "embedder_model": "org/clip", "num_clusters": 8},
        "num_shards": 16,
    }
    (tmp_path / "icons.json").write_text(json.dumps(old))
    config = read_home_config(tmp_path)
    assert (config.lora.r, config.lora.alpha, config.gradients.dim, config.selection.method) == (16, 32, 1024, "mean")
    assert (config.selection.p, config.warmup.ratio, config.influence.write_matrix) == (0.1, 0.2, True)
    assert (config.embedder.kind, config.embedder.name_or_path, config.ofa.num_clusters) == ("clip", "org/clip", 8)
    assert config.data.num_shards == 16 and config.model.name_or_path == "org/m"
    rewritten = json.loads((tmp_path / "icons.json").read_text())
    assert "settings" not in rewritten and rewritten["gradients"]["dim"] == 1024
    assert read_home_config(tmp_path) == config


def test_a_home_without_icons_json_has_the_defaults_and_says_what_to_configure(tmp_path):
    config = read_home_config(tmp_path)
    assert config == IconsConfig()
    with pytest.raises(ValueError, match=r"no pool configured \(data\.pool\): run `icons-dagster demo`"):
        config.data.pool_path()
    write_home_config(tmp_path, config.replace(data={"pool": "/p.json"}))
    assert section_to_json(read_home_config(tmp_path).data)["pool"] == "/p.json"


def test_registries_feed_the_config_the_cli_and_the_evaluation(monkeypatch):
    """An aggregation rule registered once is a config choice, a CLI choice, a vote-table
    column and an evaluation method; a method name is read in one place."""
    import numpy as np

    from icons_dagster.core.evaluation.methods import DEFAULT_METHODS, ICONS_RULES, parse_method
    from icons_dagster.core.selection import consensus

    assert SECTIONS["selection"].__dataclass_fields__["method"].metadata["choices"] == tuple(consensus.AGGREGATIONS)
    assert set(ICONS_RULES.values()) == set(consensus.AGGREGATIONS) and set(ICONS_RULES) <= set(DEFAULT_METHODS)
    scores = np.array([[0.1, 0.9], [0.5, 0.4], [0.3, 0.2]])
    assert consensus.aggregate(scores, "max").tolist() == [0.9, 0.5, 0.3]
    assert consensus.aggregate(scores, "vote", p=1 / 3).tolist() == [1.0, 1.0, 0.0]  # each column's top third
    assert parse_method("random-7").seed == 7 and parse_method("random-7").kind == "random"
    assert (parse_method("icons-cover-25").coverage, parse_method("icons-cover-25").aggregation) == (0.25, "vote")
    assert (parse_method("icons-maxrank").tiebreak, parse_method("icons-norm").aggregation) == ("max-rank", "norm")
    assert parse_method("text-vote").kind == "baseline" and parse_method("ofa").kind == "exported"
    assert (parse_method("icons-quota").groups, parse_method("icons-quota").group_shares) == ("source", "voters")
    assert (parse_method("icons-cluster").groups, parse_method("icons-cluster").group_shares) == ("cluster", "pool")
    assert parse_method("icons-wvote").aggregation == "wvote" and {"icons-quota", "icons-cluster", "icons-wvote"} <= set(DEFAULT_METHODS)
    assert (parse_method("icons-filter").aggregation, parse_method("icons-filter").tiebreak) == ("filter", "id-hash")
    with pytest.raises(ValueError, match=r"unknown evaluation method 'icons-median': full, random-<seed>"):
        parse_method("icons-median")
    with pytest.raises(SystemExit):  # the CLI offers exactly the registered rules
        build_parser().parse_args(["run", "--selection-method", "median"])


def test_a_malformed_icons_json_is_refused_naming_the_file(tmp_path):
    (tmp_path / "icons.json").write_text("{oops")
    with pytest.raises(ValueError, match=r"icons\.json: malformed JSON"):
        read_home_config(tmp_path)
    (tmp_path / "icons.json").write_text("[1]")
    with pytest.raises(ValueError, match=r"icons\.json: expected a JSON object of sections \['data'"):
        read_home_config(tmp_path)
