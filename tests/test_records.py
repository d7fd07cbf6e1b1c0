"""Tests for icons_dagster.core.data.records: every validation rule has a case."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
from PIL import Image

from icons_dagster.core.data.records import (
    ImageLoadError,
    LoadedRecords,
    Record,
    RecordFileError,
    RecordProblem,
    Turn,
    benchmark_image_root,
    find_benchmarks,
    load_image,
    load_records,
    resolve_image_path,
    split_file,
)


# --------------------------------------------------------------------------- helpers


def conv(q: str = "<image>\nWhat is this?", a: str = "A cat.") -> list[dict]:
    return [{"from": "human", "value": q}, {"from": "gpt", "value": a}]


def img_rec(rid, image="a.png", **extra) -> dict:
    return {"id": rid, "image": image, "conversations": conv(), **extra}


def text_rec(rid, **extra) -> dict:
    return {"id": rid, "conversations": conv("Say hi.", "Hi."), **extra}


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """An image root with two real 8x8 PNGs: a.png and sub/b.png."""
    r = tmp_path / "images"
    (r / "sub").mkdir(parents=True)
    Image.new("RGB", (8, 8), (255, 0, 0)).save(r / "a.png")
    Image.new("L", (8, 8), 128).save(r / "sub" / "b.png")
    return r


def write_json(path: Path, records) -> Path:
    path.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    return path


def write_jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def load_one(tmp_path: Path, root: Path | None, rec, **kw) -> LoadedRecords:
    return load_records(write_json(tmp_path / "one.json", [rec]), root, **kw)


def only_reason(loaded: LoadedRecords) -> str:
    assert loaded.records == ()
    assert len(loaded.problems) == 1
    return loaded.problems[0].reason


# --------------------------------------------------------------------------- happy path


def test_valid_records_fields_and_raw_json_roundtrip(tmp_path, root):
    recs = [
        img_rec("x1", extra_key={"k": [1, 2]}, subtask="vqa"),
        {"conversations": conv("<image>\nQ?", "Ünïcødé ✓"), "image": "sub/b.png", "id": "x2", "subtask": "ocr"},
        text_rec("x3", subtask="chat"),
    ]
    path = write_json(tmp_path / "pool.json", recs)
    loaded = load_records(path, root)
    assert loaded.problems == ()
    assert [r.id for r in loaded.records] == ["x1", "x2", "x3"]
    assert [r.index for r in loaded.records] == [0, 1, 2]
    r1, r2, r3 = loaded.records
    assert r1.image == "a.png" and r1.image_path == (root / "a.png").resolve()
    assert r2.image_path == (root / "sub" / "b.png").resolve()
    assert r3.image is None and r3.image_path is None
    assert r1.turns == (Turn("human", "<image>\nWhat is this?"), Turn("gpt", "A cat."))
    assert [r.subtask for r in loaded.records] == ["vqa", "ocr", "chat"]
    for rec, r in zip(recs, loaded.records):
        assert json.loads(r.raw_json) == rec
        assert list(json.loads(r.raw_json)) == list(rec)  # key order kept
        assert r.raw_json == json.dumps(rec, ensure_ascii=False, separators=(",", ":"))
    assert "Ünïcødé ✓" in r2.raw_json
    import hashlib

    assert loaded.content_sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert loaded.path == path


def test_multi_turn_and_int_ids(tmp_path, root):
    rec = {
        "id": 42,
        "image": "a.png",
        "conversations": [
            {"from": "human", "value": "<image>\nQ1"},
            {"from": "gpt", "value": "A1"},
            {"from": "human", "value": "Q2"},
            {"from": "gpt", "value": "A2"},
        ],
    }
    loaded = load_records(write_json(tmp_path / "p.json", [rec, text_rec(7)]), root)
    assert [r.id for r in loaded.records] == ["42", "7"]
    assert all(isinstance(r.id, str) for r in loaded.records)
    assert len(loaded.records[0].turns) == 4
    assert json.loads(loaded.records[0].raw_json)["id"] == 42  # raw stays untouched


def test_text_only_without_image_root(tmp_path):
    loaded = load_one(tmp_path, None, text_rec("t"))
    assert [r.id for r in loaded.records] == ["t"]


def test_image_null_means_text_only(tmp_path, root):
    loaded = load_one(tmp_path, root, text_rec("t", image=None))
    assert loaded.records[0].image is None


# --------------------------------------------------------------------------- record problems


@pytest.mark.parametrize(
    "rec, rid, reason",
    [
        ([1, 2], None, "record is not a JSON object (got list)"),
        ("s", None, "record is not a JSON object (got str)"),
        ({"conversations": conv()}, None, "missing 'id'"),
        ({"id": "", "conversations": conv()}, None, "'id' is empty"),
        ({"id": "  ", "conversations": conv()}, None, "'id' is empty"),
        ({"id": 1.5, "conversations": conv()}, None, "'id' must be a string or integer, got float"),
        ({"id": True, "conversations": conv()}, None, "'id' must be a string or integer, got bool"),
        ({"id": None, "conversations": conv()}, None, "'id' must be a string or integer, got NoneType"),
        ({"id": "c", "image": "a.png"}, "c", "missing 'conversations'"),
        ({"id": "c", "image": "a.png", "conversations": {}}, "c", "'conversations' must be a list, got dict"),
        ({"id": "c", "image": "a.png", "conversations": []}, "c", "'conversations' is empty"),
        (
            {"id": "c", "conversations": ["hi", {"from": "gpt", "value": "x"}]},
            "c",
            "turn 1 is not an object (got str)",
        ),
        (
            {"id": "c", "conversations": [{"from": 1, "value": "q"}, {"from": "gpt", "value": "a"}]},
            "c",
            "turn 1: 'from' must be a string, got int",
        ),
        (
            {"id": "c", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt"}]},
            "c",
            "turn 2: 'value' must be a string, got NoneType",
        ),
        (
            {"id": "c", "conversations": [{"from": "user", "value": "q"}, {"from": "gpt", "value": "a"}]},
            "c",
            "turn 1: role 'user' is not supported (only 'human' and 'gpt')",
        ),
        (
            {"id": "c", "conversations": [{"from": "human", "value": "q"}, {"from": "assistant", "value": "a"}]},
            "c",
            "turn 2: role 'assistant' is not supported (only 'human' and 'gpt')",
        ),
        (
            {"id": "c", "conversations": [{"from": "gpt", "value": "a"}, {"from": "human", "value": "q"}]},
            "c",
            "turn 1: expected 'human' but got 'gpt' (turns must alternate, starting with 'human')",
        ),
        (
            {"id": "c", "conversations": [{"from": "human", "value": "q"}, {"from": "human", "value": "q"}]},
            "c",
            "turn 2: expected 'gpt' but got 'human' (turns must alternate, starting with 'human')",
        ),
        ({"id": "c", "conversations": [{"from": "human", "value": "q"}]}, "c", "no answer turn"),
        (
            {"id": "c", "conversations": conv("q", "a") + [{"from": "human", "value": "q2"}]},
            "c",
            "turn 3: trailing 'human' turn has no answer",
        ),
        ({"id": "c", "conversations": conv("q", "")}, "c", "empty answer in turn 2"),
        (
            {"id": "c", "conversations": conv("q", "a") + conv("q2", " \n\t")},
            "c",
            "empty answer in turn 4",
        ),
    ],
)
def test_structural_problems(tmp_path, root, rec, rid, reason):
    loaded = load_one(tmp_path, root, rec)
    assert only_reason(loaded) == reason
    p = loaded.problems[0]
    assert p.record_id == rid and p.index == 0 and p.file == str(tmp_path / "one.json")


@pytest.mark.parametrize(
    "image, reason",
    [
        (["a.png", "sub/b.png"], "multiple images are not supported"),
        (3, "'image' must be a string, got int"),
        ("", "image path is empty"),
    ],
)
def test_bad_image_field(tmp_path, root, image, reason):
    assert only_reason(load_one(tmp_path, root, img_rec("i", image=image))) == reason


def test_image_without_root(tmp_path):
    reason = only_reason(load_one(tmp_path, None, img_rec("i")))
    assert reason == "record has an image but no image root was given"


@pytest.mark.parametrize("image", ["../outside.png", "sub/../../outside.png", "sub/../a.png"])
def test_dotdot_escapes(tmp_path, root, image):
    reason = only_reason(load_one(tmp_path, root, img_rec("i", image=image)))
    assert reason.startswith("image path escapes the image root")
    assert repr(image) in reason


def test_absolute_path_escapes(tmp_path, root):
    image = str(root / "a.png")  # even an absolute path that lands inside is refused
    reason = only_reason(load_one(tmp_path, root, img_rec("i", image=image)))
    assert reason.startswith("image path escapes the image root") and "absolute" in reason


@pytest.mark.skipif(sys.platform == "win32", reason="symlinks")
def test_symlink_escapes(tmp_path, root):
    outside = tmp_path / "outside"
    outside.mkdir()
    Image.new("RGB", (8, 8)).save(outside / "x.png")
    os.symlink(outside, root / "linkdir")  # directory symlink leading out
    os.symlink(outside / "x.png", root / "link.png")  # file symlink leading out
    os.symlink(root / "a.png", root / "inner.png")  # file symlink staying inside: fine
    recs = [img_rec("d", image="linkdir/x.png"), img_rec("f", image="link.png"), img_rec("ok", image="inner.png")]
    loaded = load_records(write_json(tmp_path / "p.json", recs), root)
    assert [r.id for r in loaded.records] == ["ok"]
    assert loaded.records[0].image_path == (root / "a.png").resolve()
    reasons = {p.record_id: p.reason for p in loaded.problems}
    assert reasons["d"].startswith("image path escapes the image root: 'linkdir/x.png'")
    assert reasons["f"].startswith("image path escapes the image root: 'link.png' is a symlink")

    with pytest.raises(ValueError, match="escapes the image root"):
        resolve_image_path(root, "linkdir/x.png")
    with pytest.raises(ValueError, match="escapes the image root"):
        resolve_image_path(root, "link.png")


def test_resolve_image_path(root):
    assert resolve_image_path(root, "sub/b.png") == (root / "sub" / "b.png").resolve()
    assert resolve_image_path(root, "./sub//b.png") == (root / "sub" / "b.png").resolve()
    assert resolve_image_path(root, "not/yet.png") == root.resolve() / "not" / "yet.png"
    for bad in ["../x.png", "/etc/passwd", "", "a/../../x"]:
        with pytest.raises(ValueError):
            resolve_image_path(root, bad)


def test_missing_image_file(tmp_path, root):
    reason = only_reason(load_one(tmp_path, root, img_rec("i", image="nope.png")))
    assert reason == f"image file not found: {root.resolve() / 'nope.png'}"
    # Without check_images the same record is accepted (no stat at all).
    loaded = load_one(tmp_path, root, img_rec("i", image="nope.png"), check_images=False)
    assert loaded.records[0].image_path == root.resolve() / "nope.png"


def test_image_is_directory(tmp_path, root):
    reason = only_reason(load_one(tmp_path, root, img_rec("i", image="sub")))
    assert reason == f"image path is not a regular file: {root.resolve() / 'sub'}"


@pytest.mark.parametrize(
    "image, q, reason",
    [
        ("a.png", "What?", "image record must have exactly one '<image>' placeholder, found 0"),
        (
            "a.png",
            "<image><image>\nWhat?",
            "image record must have exactly one '<image>' placeholder, found 2 (turn 1 x2)",
        ),
        (None, "<image>\nWhat?", "text-only record must have no '<image>' placeholder, found 1 (turn 1)"),
    ],
)
def test_placeholder_counts(tmp_path, root, image, q, reason):
    rec = {"id": "p", "conversations": conv(q, "A.")}
    if image:
        rec["image"] = image
    assert only_reason(load_one(tmp_path, root, rec)) == reason


def test_placeholder_position(tmp_path, root):
    rec = {
        "id": "p",
        "image": "a.png",
        "conversations": conv("Q1", "A1") + conv("<image>\nQ2", "A2"),
    }
    assert only_reason(load_one(tmp_path, root, rec)) == (
        "the '<image>' placeholder must be in the first human turn, found in turn 3"
    )
    rec["conversations"] = conv("<image>Q1", "A1 <image>")
    assert only_reason(load_one(tmp_path, root, rec)) == (
        "image record must have exactly one '<image>' placeholder, found 2 (turn 1, turn 2)"
    )


def test_duplicates_first_kept(tmp_path, root):
    recs = [img_rec("d"), text_rec("e"), text_rec("d"), img_rec("d"), text_rec(5), text_rec("5")]
    loaded = load_records(write_json(tmp_path / "p.json", recs), root)
    assert [(r.id, r.index) for r in loaded.records] == [("d", 0), ("e", 1), ("5", 4)]
    assert [(p.index, p.record_id, p.reason) for p in loaded.problems] == [
        (2, "d", "duplicate id 'd' (first seen at record #0)"),
        (3, "d", "duplicate id 'd' (first seen at record #0)"),
        (5, "5", "duplicate id '5' (first seen at record #4)"),
    ]


def test_count_identity_and_order_with_mixed_problems(tmp_path, root):
    recs = [img_rec("a"), "junk", img_rec("b", image="missing.png"), text_rec("c"), {"id": "d"}, img_rec("a")]
    loaded = load_records(write_json(tmp_path / "p.json", recs), root)
    assert len(loaded.records) + len(loaded.problems) == len(recs) == loaded.n_entries
    assert [r.id for r in loaded.records] == ["a", "c"]
    assert [p.index for p in loaded.problems] == [1, 2, 4, 5]
    indices = sorted([r.index for r in loaded.records] + [p.index for p in loaded.problems])
    assert indices == list(range(len(recs)))


def test_problem_str():
    p = RecordProblem("f.json", 3, "abc", "no answer turn")
    assert str(p) == "f.json: record #3 (id 'abc'): no answer turn"
    assert str(RecordProblem("f.json", 0, None, "missing 'id'")) == "f.json: record #0 (no id): missing 'id'"


def test_records_are_frozen(tmp_path, root):
    r = load_one(tmp_path, root, img_rec("a")).records[0]
    assert isinstance(r, Record)
    with pytest.raises(AttributeError):
        r.id = "b"  # type: ignore[misc]


# --------------------------------------------------------------------------- subtasks


def test_subtask_mixed_raises(tmp_path, root):
    recs = [text_rec("a", subtask="x"), text_rec("b"), text_rec("c", subtask=""), text_rec("d", subtask="y")]
    path = write_json(tmp_path / "p.json", recs)
    with pytest.raises(RecordFileError) as ei:
        load_records(path, root)
    msg = str(ei.value)
    assert str(path) in msg
    assert "subtask must be on every record or on none" in msg
    assert "'b', 'c'" in msg and "'a'" not in msg.split("records without one:")[1]
    # "ignore" lets it through.
    loaded = load_records(path, root, subtasks="ignore")
    assert [r.subtask for r in loaded.records] == ["x", None, None, "y"]


def test_subtask_mixed_lists_first_few_ids(tmp_path):
    recs = [text_rec("has", subtask="s")] + [text_rec(f"n{i}") for i in range(8)]
    with pytest.raises(RecordFileError, match=r"'n0', 'n1', 'n2', 'n3', 'n4' and 3 more"):
        load_records(write_json(tmp_path / "p.json", recs), None)


def test_subtask_only_judged_on_valid_records(tmp_path):
    # The record without subtask is invalid anyway, so the file is not "mixed".
    recs = [text_rec("a", subtask="s"), {"id": "b", "conversations": []}]
    loaded = load_records(write_json(tmp_path / "p.json", recs), None)
    assert [r.id for r in loaded.records] == ["a"]


def test_subtask_non_string(tmp_path):
    recs = [text_rec("a", subtask="s"), text_rec("b", subtask=3)]
    loaded = load_records(write_json(tmp_path / "p.json", recs), None)
    assert [(p.record_id, p.reason) for p in loaded.problems] == [("b", "'subtask' must be a string, got int")]
    loaded = load_records(write_json(tmp_path / "p.json", recs), None, subtasks="ignore")
    assert [r.subtask for r in loaded.records] == ["s", None]


def test_subtask_mode_validated(tmp_path):
    with pytest.raises(ValueError, match="subtasks must be one of"):
        load_records(write_json(tmp_path / "p.json", []), None, subtasks="allow")


# --------------------------------------------------------------------------- whole-file errors


def test_malformed_json_file(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('[\n  {"id": "a"},\n  {"id": \n]\n', encoding="utf-8")
    with pytest.raises(RecordFileError, match=r"bad\.json: malformed JSON at line 4, column 1"):
        load_records(path, None)


def test_top_level_not_list(tmp_path):
    path = write_json(tmp_path / "obj.json", {"id": "a"})
    with pytest.raises(RecordFileError, match=r"obj\.json: top-level JSON value must be a list of records, got dict"):
        load_records(path, None)


def test_non_utf8(tmp_path):
    path = tmp_path / "latin.json"
    path.write_bytes(b'[\n{"id": "caf\xe9"}]')
    with pytest.raises(RecordFileError, match=r"latin\.json: not valid UTF-8 at line 2"):
        load_records(path, None)
    path = tmp_path / "latin.jsonl"
    path.write_bytes(json.dumps(text_rec("a")).encode() + b'\n{"id": "caf\xe9"}\n')
    with pytest.raises(RecordFileError, match=r"latin\.jsonl: not valid UTF-8 at line 2"):
        load_records(path, None)


def test_missing_file_and_bad_extension(tmp_path):
    with pytest.raises(RecordFileError, match=r"nope\.json: cannot read file"):
        load_records(tmp_path / "nope.json", None)
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(RecordFileError, match=r"x\.csv: unsupported file extension"):
        load_records(tmp_path / "x.csv", None)


def test_empty_list_ok(tmp_path):
    loaded = load_records(write_json(tmp_path / "e.json", []), None)
    assert loaded.records == () and loaded.problems == ()


def test_utf8_bom_tolerated(tmp_path):
    path = tmp_path / "bom.json"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps([text_rec("a")]).encode())
    assert [r.id for r in load_records(path, None).records] == ["a"]


# --------------------------------------------------------------------------- JSONL


def test_jsonl_partial_malformed(tmp_path, root):
    lines = [
        json.dumps(img_rec("a")),
        "",
        '{"id": "broken", ',
        "   ",
        json.dumps(text_rec("b")),
        "[1, 2]",
        json.dumps(text_rec(3)),
    ]
    path = write_jsonl(tmp_path / "p.jsonl", lines)
    loaded = load_records(path, root)
    assert [(r.id, r.index) for r in loaded.records] == [("a", 0), ("b", 2), ("3", 4)]
    assert [(p.index, p.record_id) for p in loaded.problems] == [(1, None), (3, None)]
    assert loaded.problems[0].reason.startswith("malformed JSON on line 3: ")
    assert loaded.problems[1].reason == "record is not a JSON object (got list)"
    assert len(loaded.records) + len(loaded.problems) == 5  # non-blank lines
    assert json.loads(loaded.records[0].raw_json) == img_rec("a")


def test_jsonl_crlf(tmp_path):
    path = tmp_path / "crlf.jsonl"
    path.write_bytes((json.dumps(text_rec("a")) + "\r\n" + json.dumps(text_rec("b")) + "\r\n").encode())
    assert [r.id for r in load_records(path, None).records] == ["a", "b"]


# --------------------------------------------------------------------------- benchmarks


def test_find_benchmarks(tmp_path):
    bdir = tmp_path / "benchmarks"
    for name, fname in [("zeta", "val.jsonl"), ("alpha", "val.json"), ("both", "val.json")]:
        (bdir / name).mkdir(parents=True)
        (bdir / name / fname).write_text("[]")
    (bdir / "both" / "val.jsonl").write_text("")
    (bdir / "noval").mkdir()
    (bdir / "noval" / "test.json").write_text("[]")
    (bdir / "stray.json").write_text("[]")
    found = find_benchmarks(bdir)
    assert list(found) == ["alpha", "both", "zeta"]
    assert found["alpha"] == bdir / "alpha" / "val.json"
    assert found["both"] == bdir / "both" / "val.json"  # .json preferred
    assert found["zeta"] == bdir / "zeta" / "val.jsonl"
    assert find_benchmarks(str(bdir)) == found


def test_find_benchmarks_missing_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        find_benchmarks(tmp_path / "nowhere")


def test_split_file(tmp_path):
    d = tmp_path / "bench"
    d.mkdir()
    assert split_file(d, "test") is None
    (d / "test.jsonl").write_text("")
    assert split_file(d, "test") == d / "test.jsonl"
    (d / "test.json").write_text("[]")
    assert split_file(d, "test") == d / "test.json"
    (d / "val.json").mkdir()  # a directory is not a split file
    assert split_file(d, "val") is None


def test_benchmark_image_root(tmp_path):
    d = tmp_path / "bench"
    d.mkdir()
    default = tmp_path / "default"
    assert benchmark_image_root(d, default) == default
    assert benchmark_image_root(d, None) is None
    (d / "images").write_text("not a dir")
    assert benchmark_image_root(d, default) == default
    (d / "images").unlink()
    (d / "images").mkdir()
    assert benchmark_image_root(d, default) == d / "images"


# --------------------------------------------------------------------------- images


def test_load_image_converts_to_rgb(root):
    im = load_image(root / "sub" / "b.png")  # saved as grayscale "L"
    assert im.mode == "RGB" and im.size == (8, 8)
    assert im.getpixel((0, 0)) == (128, 128, 128)


def test_load_image_corrupt(tmp_path, root):
    bad = tmp_path / "corrupt.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nthis is not a png")
    with pytest.raises(ImageLoadError, match="corrupt.png") as ei:
        load_image(bad)
    assert isinstance(ei.value, ValueError)
    truncated = tmp_path / "trunc.png"
    truncated.write_bytes((root / "a.png").read_bytes()[:40])
    with pytest.raises(ImageLoadError, match="trunc.png"):
        load_image(truncated)
    with pytest.raises(ImageLoadError, match="absent.png"):
        load_image(tmp_path / "absent.png")


def test_validation_never_decodes_images(tmp_path, root):
    (root / "corrupt.png").write_bytes(b"garbage")
    loaded = load_one(tmp_path, root, img_rec("c", image="corrupt.png"))
    assert [r.id for r in loaded.records] == ["c"]


def test_core_does_not_import_dagster():
    # Parse the module's own imports (the package __init__ may legitimately import dagster).
    import ast

    import icons_dagster.core.data.records as mod

    tree = ast.parse(Path(mod.__file__).read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0] if not node.module.startswith("icons_dagster.core.") else "icons_dagster.core")
    assert "dagster" not in names and "icons_dagster" not in names  # core modules only
    stdlib = {"__future__", "gc", "hashlib", "json", "os", "stat", "dataclasses", "pathlib", "typing", "collections", "concurrent", "contextlib", "warnings"}
    assert names <= stdlib | {"PIL", "icons_dagster.core"}


def test_gc_state_restored(tmp_path):
    import gc

    assert gc.isenabled()
    load_records(write_json(tmp_path / "p.json", [text_rec("a")]), None)
    assert gc.isenabled()
    with pytest.raises(RecordFileError):
        load_records(write_json(tmp_path / "p.json", {"not": "a list"}), None)
    assert gc.isenabled()
