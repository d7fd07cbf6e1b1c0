"""``icons-dagster align``: stage-1 alignment of a checkpoint on a caption file (core/model/alignment.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from icons_dagster.cli import main
from icons_dagster.demo.data import ALIGN_FILE, generate_alignment_data

STEPS = ["--steps", "8", "--batch-size", "8"]  # a handful of steps: seconds, and the loss still falls


@pytest.fixture(scope="module")
def captions(tmp_path_factory) -> Path:
    """40 generated captions (their own images): the world the pre-registration aligns on, small."""
    return generate_alignment_data(tmp_path_factory.mktemp("align") / "caps", 40)


def _args(captions: Path, model: Path, out: Path, *extra: str, file: Path | None = None) -> list[str]:
    return ["align", "--captions", str(file or captions / ALIGN_FILE), "--image-root", str(captions / "images"), "--model", str(model), "--out", str(out), *extra]


def _report(out: Path) -> dict:
    return json.loads((out / "alignment.json").read_text(encoding="utf-8"))


def _changed(before: dict, after: dict, prefix: str) -> list[bool]:
    names = [k for k in before if k.startswith(prefix)]
    assert names, prefix
    return [not before[k].equal(after[k]) for k in names]


def test_align_trains_projector_and_lm_reports_and_reuses(captions, tiny_model_dir, tmp_path, capsys):
    from transformers import AutoModelForImageTextToText

    out = tmp_path / "aligned"
    args = _args(captions, tiny_model_dir, out, *STEPS, "--heldout-fraction", "0.25")
    assert main(args) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert f"aligned checkpoint: {out}" in printed and "held-out caption loss" in printed

    report = _report(out)
    held = report["heldout"]
    assert held["n_records"] == 10 and held["n_encoded"] == 10  # 25% of 40 images, one caption each
    assert report["n_records"] == 30 and report["captions"]["n_usable"] == 40 and report["captions"]["n_problems"] == 0
    assert held["loss_after"] < held["loss_before"] - 1.0, held  # from ~ln(vocabulary) = 6.8
    assert held["loss_after_mismatched_images"] > 0
    assert report["recipe"]["steps"] == 8 and report["recipe"]["num_threads"] == 1
    assert [p["step"] for p in report["loss_curve"]] == [8] and report["epochs_started"] == 3  # 3 full batches of 8 per pass over 30
    assert report["trained"] == ["model.multi_modal_projector", "model.language_model", "lm_head"]
    assert report["frozen"] == ["model.vision_tower"]

    base = load_file(str(tiny_model_dir / "model.safetensors"))
    trained = load_file(str(out / "model.safetensors"))
    assert base.keys() == trained.keys()
    assert not any(_changed(base, trained, "vision_tower."))  # the checkpoint's (legacy) key layout
    assert all(_changed(base, trained, "multi_modal_projector."))
    assert any(_changed(base, trained, "language_model."))
    assert type(AutoModelForImageTextToText.from_pretrained(str(out))).__name__ == "LlavaForConditionalGeneration"

    # The same call again: the finished folder is reused, untouched.
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert main(args) == 0
    assert f"reused: {out}" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamps

    # Another recipe into the same folder: refused without --force, nothing touched.
    assert main(_args(captions, tiny_model_dir, out, "--steps", "9", "--batch-size", "8", "--heldout-fraction", "0.25")) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"align: {out}: holds an alignment") and "--force" in err and "\n" not in err
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamps
    # A folder that is no alignment output is never replaced, even with --force.
    assert main(_args(captions, tiny_model_dir, tiny_model_dir.parent, *STEPS, "--force")) == 2
    assert "not an alignment output" in capsys.readouterr().err
    assert not list(tmp_path.glob("*.tmp-*"))


def test_align_projector_only_counts_broken_records(captions, tiny_model_dir, tmp_path, capsys):
    records = json.loads((captions / ALIGN_FILE).read_text(encoding="utf-8"))[:24]
    answer = records[0]["conversations"]
    records += [
        {"id": "escape", "image": "../outside.png", "conversations": answer},
        {"id": "noanswer", "image": records[1]["image"], "conversations": answer[:1]},
        {"id": "textonly", "conversations": [{"from": "human", "value": "Hi?"}, {"from": "gpt", "value": "Hello."}]},
    ]
    broken = tmp_path / "caps.json"
    broken.write_text(json.dumps(records), encoding="utf-8")
    out = tmp_path / "projector-only"
    assert main(_args(captions, tiny_model_dir, out, *STEPS, "--train", "projector", "--heldout-fraction", "0", file=broken)) == 0
    printed = capsys.readouterr().out
    assert f"24 usable of 27 in {broken}; 3 skipped" in printed and "(id 'escape'): image path escapes the image root" in printed

    report = _report(out)
    assert report["captions"]["n_problems"] == 3 and len(report["captions"]["problems"]) == 3
    assert "(id 'textonly'): no image" in report["captions"]["problems"][2]
    assert report["heldout"] is None and report["n_records"] == 24
    assert report["trained"] == ["model.multi_modal_projector"]
    base = load_file(str(tiny_model_dir / "model.safetensors"))
    trained = load_file(str(out / "model.safetensors"))
    changed = {k for k in base if not base[k].equal(trained[k])}
    assert changed and all(k.startswith("multi_modal_projector.") for k in changed)
    assert report["trainable_parameters"] == sum(v.numel() for k, v in base.items() if k.startswith("multi_modal_projector."))


def test_align_bad_input_is_one_line_naming_the_file(captions, tiny_model_dir, tmp_path, capsys):
    unusable = tmp_path / "none.json"
    unusable.write_text(json.dumps([{"id": "a", "image": "missing.png", "conversations": [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "x"}]}]))
    malformed = tmp_path / "bad.json"
    malformed.write_text("[{")
    out = tmp_path / "out"
    cases = [
        (_args(captions, tiny_model_dir, out, file=unusable), f"{unusable}: none of its 1 records is usable (first: record #0, id 'a'"),
        (_args(captions, tiny_model_dir, out, file=malformed), str(malformed)),
        (_args(captions, tiny_model_dir, out, file=tmp_path / "absent.json"), f"{tmp_path / 'absent.json'}: no such caption file"),
        (_args(captions, tmp_path / "no-model", out), "no-model"),
        (_args(captions, tiny_model_dir, out, "--steps", "0"), "steps and batch size must be >= 1"),
    ]
    if not torch.cuda.is_available():
        cases.append((_args(captions, tiny_model_dir, out, "--device", "cuda"), "device cuda: no CUDA device is available here"))
    for args, expected in cases:
        assert main(args) == 2, args
        err = capsys.readouterr().err.strip()
        assert err.startswith("align: ") and expected in err and "\n" not in err, err
    assert not out.exists() and not list(tmp_path.glob("*.tmp-*"))


def test_align_lm_only_trains_on_text_only_records(captions, tiny_model_dir, tmp_path, capsys):
    """``--train lm``: text-only records are usable, the language model and head train, the
    projector and vision tower keep their weights; a held-out fraction splits text records one by one."""
    images = json.loads((captions / ALIGN_FILE).read_text(encoding="utf-8"))[:4]
    texts = [
        {"id": f"t{i}", "conversations": [{"from": "human", "value": f"The image shows the digit {i % 10}.\nWhat number is written here?"},
                                          {"from": "gpt", "value": str(i % 10)}]}
        for i in range(36)
    ]  # fmt: skip
    mixed = tmp_path / "texts.json"
    mixed.write_text(json.dumps(texts + images), encoding="utf-8")
    out = tmp_path / "text-stage"
    assert main(_args(captions, tiny_model_dir, out, *STEPS, "--train", "lm", "--heldout-fraction", "0.25", file=mixed)) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert f"40 usable of 40 in {mixed}; 0 skipped" in printed and "n/a (one image, or text-only records)" in printed

    report = _report(out)
    assert report["trained"] == ["model.language_model", "lm_head"]
    assert report["frozen"] == ["model.vision_tower", "model.multi_modal_projector"]
    assert report["heldout"]["n_records"] == 10 and report["n_records"] == 30  # 25% of 40 groups: 36 texts + 4 images
    assert report["heldout"]["loss_after_mismatched_images"] is None
    assert report["heldout"]["loss_after"] < report["heldout"]["loss_before"]
    base = load_file(str(tiny_model_dir / "model.safetensors"))
    trained = load_file(str(out / "model.safetensors"))
    changed = {k for k in base if not base[k].equal(trained[k])}
    assert changed and all(k.startswith(("language_model.", "lm_head.")) for k in changed)

    # The same file without --train lm: the text-only records are skipped and listed.
    assert main(_args(captions, tiny_model_dir, tmp_path / "projector", *STEPS, "--heldout-fraction", "0", file=mixed)) == 0
    assert f"4 usable of 40 in {mixed}; 36 skipped" in capsys.readouterr().out


def test_align_texts_alongside_and_record_mean(captions, tiny_model_dir, tmp_path, capsys):
    """``--texts``: text-only records train beside the captions (the LM must train; a record
    with an image is refused by id); ``--loss-mean record`` weighs each record equally,
    checked against the per-record losses by hand."""
    from icons_dagster.core.model.alignment import _batch_loss, load_model
    from icons_dagster.core.model.encoding import ConversationEncoder, per_sample_loss, collate
    from icons_dagster.core.model.samples import SkipLog, encode_records
    from icons_dagster.core.data.records import load_records

    texts = [
        {"id": f"t{i}", "conversations": [{"from": "human", "value": f"The image shows the digit {i % 10}.\nIs it {i % 3}? Answer yes or no."},
                                          {"from": "gpt", "value": "Yes" if i % 10 == i % 3 else "No"}]}
        for i in range(12)
    ]  # fmt: skip
    text_file = tmp_path / "texts.json"
    text_file.write_text(json.dumps(texts), encoding="utf-8")
    out = tmp_path / "with-texts"
    common = (*STEPS, "--heldout-fraction", "0.25", "--texts", str(text_file))
    assert main(_args(captions, tiny_model_dir, out, *common, "--loss-mean", "record")) == 0, capsys.readouterr().err
    assert f"texts: 12 text-only records from {text_file}" in capsys.readouterr().out
    report = _report(out)
    assert report["n_records"] == 30 + 12 and report["recipe"]["loss_mean"] == "record" and report["texts"]["n_usable"] == 12
    assert report["heldout"]["n_records"] == 10  # the held-out split is the captions' alone

    # Token mean (the default) on the same inputs: other weights; the key tells the two apart.
    token = tmp_path / "token"
    assert main(_args(captions, tiny_model_dir, token, *common)) == 0
    assert _report(token)["key"] != report["key"]
    record_weights, token_weights = load_file(str(out / "model.safetensors")), load_file(str(token / "model.safetensors"))
    assert any(_changed(record_weights, token_weights, "language_model."))

    # The projector alone cannot learn from text; a texts file with an image record is refused by id.
    capsys.readouterr()
    assert main(_args(captions, tiny_model_dir, tmp_path / "p", *STEPS, "--train", "projector", "--texts", str(text_file))) == 2
    assert "train='projector' keeps frozen" in capsys.readouterr().err
    caps = json.loads((captions / ALIGN_FILE).read_text(encoding="utf-8"))
    text_file.write_text(json.dumps(texts + caps[:1]), encoding="utf-8")
    assert main(_args(captions, tiny_model_dir, tmp_path / "q", *STEPS, "--texts", str(text_file))) == 2
    err = capsys.readouterr().err
    assert f"id {caps[0]['id']!r}: has an image" in err and str(text_file) in err

    # The two means by hand: a 1-token answer and a caption of many tokens.
    processor, model, placement = load_model(tiny_model_dir)
    encoder = ConversationEncoder(processor, 512)
    records = load_records(text_file, captions / "images").records
    samples = list(encode_records(encoder, [records[0], records[-1]], SkipLog()))
    batch = collate(samples, encoder.tokenizer.pad_token_id)
    with torch.no_grad():
        per_record = per_sample_loss(model(**batch.model_inputs(placement.device, placement.dtype)).logits.float(), batch.labels)
        counts = (batch.labels[:, 1:] != -100).sum(dim=1).float()
        assert counts[0] < counts[1]  # "Yes"/"No" against a caption
        record_mean, n = _batch_loss(model, samples, encoder.tokenizer.pad_token_id, placement, "record")
        token_mean, _ = _batch_loss(model, samples, encoder.tokenizer.pad_token_id, placement)
    assert n == int(counts.sum())
    assert torch.isclose(record_mean, per_record.mean()) and torch.isclose(token_mean, (per_record * counts).sum() / counts.sum())
    assert not torch.isclose(record_mean, token_mean)
