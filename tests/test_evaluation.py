"""Benchmark scoring: likelihood of closed-form candidates, token F1 of long answers, collapse flag, Rel."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import numpy as np
import pytest
import torch

from icons_dagster.core.config import LoraSettings, ModelConfig, WarmupConfig
from icons_dagster.core.model.encoding import IGNORE_INDEX, to_messages
from icons_dagster.core.evaluation.metrics import (
    KINDS,
    answer_log_likelihoods,
    candidate_answers,
    collapsed,
    greedy_answer,
    infer_kind,
    normalize_answer,
    question_options,
    chance_threshold,
    informative_benchmarks,
    relative_scores,
    results_markdown,
    score_benchmark,
    token_f1,
)
from icons_dagster.core.model.cache import MODELS
from icons_dagster.core.data.records import Turn, benchmark_image_root, load_image, load_records, split_file
from icons_dagster.core.model.samples import SkipLog
from icons_dagster.core.model.training import train_warmup


@pytest.fixture(scope="module")
def config(tiny_model_dir):
    return ModelConfig(name_or_path=str(tiny_model_dir), max_length=512)


@pytest.fixture(scope="module")
def scorer(config):
    """(base model, encoder, placement) of the tiny LLaVA."""
    _, model, placement = MODELS.get(config)
    return model, MODELS.encoder(config), placement


@pytest.fixture(scope="module")
def splits(demo_paths):
    def load(name: str, split: str = "test"):
        folder = demo_paths.benchmarks / name
        loaded = load_records(split_file(folder, split), benchmark_image_root(folder, demo_paths.image_root))
        assert not loaded.problems
        return list(loaded.records)

    return load


def with_answer(record, answer: str):
    return dataclasses.replace(record, turns=record.turns[:-1] + (Turn("gpt", answer),))


# -- text ---------------------------------------------------------------------------------


def test_normalize_answer():
    assert normalize_answer("  Yes. ") == "yes"
    assert normalize_answer("The  Red\tCat!") == "the red cat"
    assert normalize_answer("3.5") == "3.5"
    assert normalize_answer("JAM") == "jam"


def test_token_f1_hand_computed():
    # articles dropped: red/cat vs red/cat/sat: 2 in common, P = 2/2, R = 2/3, F1 = 2PR/(P+R) = 4/5
    assert token_f1("the red cat", "a red cat sat") == pytest.approx(4 / 5)
    assert token_f1("the", "a") == 1.0  # both empty once articles go
    assert token_f1("Red, cat.", "red cat") == 1.0  # punctuation stripped per token
    assert token_f1("red red", "red") == pytest.approx(2 / 3)  # bag of tokens: P = 1/2, R = 1
    assert token_f1("dog", "cat") == 0.0
    assert token_f1("", "") == 1.0
    assert token_f1("...", "") == 1.0  # only punctuation: empty after normalization
    assert token_f1("cat", "") == 0.0 and token_f1("", "cat") == 0.0


@pytest.mark.parametrize(
    "benchmark, kind",
    [
        ("yes_no", "yes_no"),
        ("multiple_choice", "multiple_choice"),
        ("counting", "short_answer"),
        ("vqa_short", "short_answer"),
        ("text_in_image", "short_answer"),
        ("long_answer", "long_answer"),
    ],
)
def test_infer_kind_on_demo_splits(splits, benchmark, kind):
    assert infer_kind(splits(benchmark)) == kind
    assert kind in KINDS


def test_infer_kind_letters_without_options_are_short_answers(splits):
    # Letter answers to questions that list no options are not multiple choice.
    records = [with_answer(r, "B") for r in splits("vqa_short")]
    assert infer_kind(records) == "short_answer"
    with pytest.raises(ValueError):
        infer_kind([])


def test_question_options_and_candidates(splits):
    record = splits("multiple_choice")[0]
    assert question_options(record.turns[-2].text) == ["A", "B", "C", "D"]
    assert question_options("Pick one\n(A) red\n(B) blue\nC) green\nI. no") == ["A", "B", "C"]
    assert question_options("What color is it?") == []
    assert candidate_answers("multiple_choice", record, []) == ["A", "B", "C", "D"]
    assert candidate_answers("multiple_choice", with_answer(record, "(c)"), []) == ["(a)", "(b)", "(c)", "(d)"]
    yes = splits("yes_no")[0]
    assert candidate_answers("yes_no", yes, []) == ["Yes", "No"]
    assert candidate_answers("yes_no", with_answer(yes, "no"), []) == ["yes", "no"]
    assert candidate_answers("short_answer", record, ["one", "two"]) == ["one", "two"]
    with pytest.raises(ValueError):
        candidate_answers("long_answer", record, [])


def test_collapsed_compares_with_the_references():
    nine_yes = ["Yes"] * 9 + ["No"]
    assert collapsed(nine_yes, references=["Yes", "No"] * 5)  # 0.9 >= 0.8 and > 0.5 + 0.2
    assert not collapsed(nine_yes, references=["yes"] * 9 + ["no"])  # the references are as concentrated
    assert not collapsed(["a"] * 7 + ["b"] * 3, references=list("abcdefghij"))  # 0.7 < 0.8
    assert collapsed(["A", "a.", "A ", "A", "B"])  # normalized before counting (4/5); no references: threshold only
    assert not collapsed([])


# -- likelihoods ----------------------------------------------------------------------------


def hand_log_likelihood(model, encoder, record, answer: str, image) -> float:
    """log p(answer tokens + end of turn | prompt) by a single forward and log_softmax, final answer only."""
    sample = encoder.encode(record.id, with_answer(record, answer).turns, image)
    prompt = encoder.render(to_messages(record.turns[:-1], has_image=True), add_generation_prompt=True)
    n_prompt = encoder.processor(text=prompt, images=[image], return_tensors="pt")["input_ids"].shape[1]
    with torch.no_grad():
        logits = model(
            input_ids=sample.input_ids[None],
            attention_mask=torch.ones_like(sample.input_ids)[None],
            pixel_values=sample.image_inputs["pixel_values"],
        ).logits[0]
    log_probs = torch.log_softmax(logits.double(), dim=-1)
    total = 0.0
    for position in range(n_prompt - 1, sample.input_ids.numel() - 1):
        target = int(sample.labels[position + 1])
        if target != IGNORE_INDEX:
            total += float(log_probs[position, target])
    return total


def test_log_likelihoods_match_a_hand_computation(scorer, splits):
    model, encoder, placement = scorer
    records = splits("vqa_short")
    record = records[0]
    answers = sorted({r.turns[-1].text for r in records})
    batched = answer_log_likelihoods(model, encoder, placement, record, answers, batch_size=16)
    single = answer_log_likelihoods(model, encoder, placement, record, answers, batch_size=1)
    assert batched.dtype == np.float64 and batched.shape == (len(answers),)
    np.testing.assert_allclose(batched, single, atol=1e-4)  # right padding changes nothing
    assert np.all(batched <= 0)
    image = load_image(record.image_path)
    for index in (0, len(answers) - 1):
        assert batched[index] == pytest.approx(hand_log_likelihood(model, encoder, record, answers[index], image), abs=1e-4)
    assert not model.training


def test_log_likelihood_counts_only_the_last_answer(scorer, demo_records):
    model, encoder, placement = scorer
    record = next(r for r in demo_records if len(r.turns) >= 4 and r.image_path is not None)
    image = load_image(record.image_path)
    got = answer_log_likelihoods(model, encoder, placement, record, ["blue", "three squares"])
    expected = [hand_log_likelihood(model, encoder, record, answer, image) for answer in ["blue", "three squares"]]
    np.testing.assert_allclose(got, expected, atol=1e-4)
    # The training encoding labels the earlier answers too; they must not count here.
    sample = encoder.encode(record.id, with_answer(record, "blue").turns, image)
    assert int((sample.labels[1:] != IGNORE_INDEX).sum()) > 2


def test_greedy_answer_is_a_deterministic_string(scorer, splits):
    model, encoder, placement = scorer
    record = splits("long_answer")[0]
    first = greedy_answer(model, encoder, placement, record, max_new_tokens=12)
    second = greedy_answer(model, encoder, placement, record, max_new_tokens=12)
    assert isinstance(first, str) and first == second and first == first.strip()
    assert first != ""  # a random model rarely emits end-of-turn first; if it did the decode would still work


# -- benchmark scores -------------------------------------------------------------------------


def test_batched_greedy_answers_are_the_one_at_a_time_answers(scorer, splits):
    """Left-padded batches of prompts of different lengths give each prompt's own greedy answer."""
    from icons_dagster.core.evaluation.metrics import _prompt, greedy_answers

    model, encoder, placement = scorer
    records = [*splits("long_answer")[:2], *splits("multiple_choice")[:2], *splits("vqa_short")[:2]]
    images = [load_image(r.image_path) for r in records]
    prompts = [_prompt(encoder, r, image) for r, image in zip(records, images)]
    assert len({len(encoder.tokenizer(p)["input_ids"]) for p in prompts}) > 1  # the batch needs padding
    one_at_a_time = [greedy_answer(model, encoder, placement, r, 8, image=image) for r, image in zip(records, images)]
    assert greedy_answers(model, encoder, placement, prompts, images, 8, batch_size=4) == one_at_a_time
    assert any(one_at_a_time)


def test_multiple_choice_score_is_argmax_accuracy(scorer, splits):
    model, encoder, placement = scorer
    records = splits("multiple_choice")
    calls = []
    result = score_benchmark(model, encoder, placement, "multiple_choice", records, progress=lambda i, n: calls.append((i, n)))
    assert (result.kind, result.metric, result.n, result.n_skipped) == ("multiple_choice", "accuracy", len(records), 0)
    assert calls == [(min(n, len(records)), len(records)) for n in range(16, len(records) + 16, 16)]  # a chunk of 16 records at a time
    correct, nll, tokens, per_record = 0, 0.0, 0, {}
    for record in records:
        options = ["A", "B", "C", "D"]
        ll = answer_log_likelihoods(model, encoder, placement, record, options)
        per_record[record.id] = float(options[int(np.argmax(ll))] == record.turns[-1].text)
        correct += per_record[record.id]
        at = options.index(record.turns[-1].text)
        nll -= ll[at]
        tokens += encoder.encode(record.id, record.turns, load_image(record.image_path)).n_answer_tokens
    assert result.score == pytest.approx(correct / len(records))
    assert result.record_scores == per_record  # each record's 0/1, in split order, for the paired bootstrap
    assert list(result.record_scores) == [r.id for r in records]
    assert result.reference_loss == pytest.approx(nll / tokens, rel=1e-5)
    assert set(result.prediction_counts) <= {"a", "b", "c", "d"}
    assert sum(result.prediction_counts.values()) == len(records)
    assert result.chance == pytest.approx(0.25)  # four options each


def test_long_answer_score_is_mean_token_f1(scorer, splits):
    model, encoder, placement = scorer
    records = splits("long_answer")[:3]
    result = score_benchmark(model, encoder, placement, "long_answer", records, max_new_tokens=6)
    assert (result.kind, result.metric, result.extra["scored_by"]) == ("long_answer", "token_f1", "greedy")
    f1 = {r.id: token_f1(greedy_answer(model, encoder, placement, r, 6), r.turns[-1].text) for r in records}
    assert result.record_scores == pytest.approx(f1)  # each record's own token F1
    assert result.score == pytest.approx(np.mean(list(f1.values())))
    assert 0.0 <= result.score <= 1.0 and result.reference_loss > 0
    assert result.chance is None  # generation, not a choice: no guessing level


def test_a_declared_answer_kind_replaces_the_inferred_one(scorer, splits, tmp_path):
    """A counting benchmark declared free-form is scored by token F1 of a greedy answer."""
    from icons_dagster.core.data.benchmarks import benchmark_problem, declared_answers

    model, encoder, placement = scorer
    records = splits("counting")[:3]
    result = score_benchmark(model, encoder, placement, "counting", records, max_new_tokens=3, kind="long_answer")
    assert (result.kind, result.metric, result.extra["scored_by"], result.chance) == ("long_answer", "token_f1", "greedy", None)
    expected = np.mean([token_f1(greedy_answer(model, encoder, placement, r, 3), r.turns[-1].text) for r in records])
    assert result.score == pytest.approx(expected)
    with pytest.raises(ValueError, match=r"benchmark counting: unknown answer kind 'essay'; choose from \['yes_no'"):
        score_benchmark(model, encoder, placement, "counting", records, kind="essay")
    folder = tmp_path / "counting"
    folder.mkdir()
    assert declared_answers(folder) is None
    (folder / "benchmark.json").write_text('{"answers": "long_answer"}')
    assert declared_answers(folder) == "long_answer"
    (folder / "benchmark.json").write_text('{"metric": "f1"}')
    with pytest.raises(ValueError, match=r"benchmark\.json: expected \{\"answers\": <kind>\}"):
        declared_answers(folder)
    assert "benchmark.json: expected" in benchmark_problem(folder, None)  # the folder sensor says why


def test_large_answer_sets_fall_back_to_greedy_exact_match(scorer, splits):
    model, encoder, placement = scorer
    records = splits("counting")[:3]
    n_answers = len({r.turns[-1].text for r in records})
    assert n_answers >= 2
    result = score_benchmark(model, encoder, placement, "counting", records, max_new_tokens=3, max_candidates=n_answers - 1)
    assert (result.metric, result.extra["scored_by"], result.extra["answer_set_size"]) == ("exact_match", "greedy", n_answers)
    predictions = [normalize_answer(greedy_answer(model, encoder, placement, r, 3)) for r in records]
    assert result.score == pytest.approx(np.mean([p == normalize_answer(r.turns[-1].text) for p, r in zip(predictions, records)]))


def test_unreadable_image_is_skipped_and_listed(scorer, splits, tmp_path):
    model, encoder, placement = scorer
    records = splits("yes_no")
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    records[2] = dataclasses.replace(records[2], image_path=broken)
    skips = SkipLog()
    result = score_benchmark(model, encoder, placement, "yes_no", records, skips=skips)
    assert (result.n, result.n_skipped) == (len(records) - 1, 1)
    assert [entry[0] for entry in skips.entries] == [records[2].id]
    assert "cannot load image" in skips.entries[0][1]
    assert result.extra["skipped"][0]["id"] == records[2].id
    assert list(result.record_scores) == [r.id for k, r in enumerate(records) if k != 2]  # the skipped record has no score
    with pytest.raises(ValueError, match="no record could be scored"):
        score_benchmark(model, encoder, placement, "yes_no", [records[2]])


def test_a_model_trained_to_say_yes_is_flagged(config, scorer, splits, tmp_path):
    _, encoder, placement = scorer
    train = [with_answer(r, "Yes") for r in splits("yes_no", "val")]
    test = splits("yes_no")
    references = [normalize_answer(r.turns[-1].text) for r in test]
    yes_share = references.count("yes") / len(references)
    base = score_benchmark(scorer[0], encoder, placement, "yes_no", test)
    assert base.prediction_counts != {"yes": len(test)}  # the untrained model does not already say Yes everywhere
    warmup = WarmupConfig(learning_rate=1e-2, batch_size=3, epochs=8, warmup_ratio=0.0, seed=0)
    with MODELS.with_adapter(config, None, LoraSettings(r=8, alpha=16, dropout=0.0), seed=0) as model:
        train_warmup(model, encoder, train, warmup, placement, tmp_path, SkipLog())
        result = score_benchmark(model, encoder, placement, "yes_no", test)
        assert greedy_answer(model, encoder, placement, test[0], max_new_tokens=4) == "Yes"
    assert result.prediction_counts == {"yes": len(test)}
    assert result.score == yes_share  # every prediction is Yes: accuracy is exactly the share of Yes references
    assert result.collapsed == (yes_share < 0.8)
    assert result.reference_loss != pytest.approx(base.reference_loss)


# -- tables ---------------------------------------------------------------------------------


def test_relative_scores_hand_computed():
    table = {
        "full": {"a": 0.5, "b": 0.8, "c": 0.0},
        "icons": {"a": 0.6, "b": 0.4, "c": 0.3},
        "random": {"a": 0.25, "b": 0.8, "c": 0.1},
    }
    rel = relative_scores(table)
    # c is left out (full scores 0): icons (0.6/0.5 + 0.4/0.8)/2 = (1.2 + 0.5)/2; random (0.5 + 1)/2
    assert rel == pytest.approx({"full": 1.0, "icons": 0.85, "random": 0.75})
    with pytest.raises(KeyError, match="full"):
        relative_scores({"icons": table["icons"]})
    with pytest.raises(KeyError, match="random"):
        relative_scores({"full": table["full"], "random": {"a": 0.1}})


def test_relative_scores_over_chosen_benchmarks():
    table = {"full": {"a": 0.5, "b": 0.8, "c": 0.4}, "icons": {"a": 0.6, "b": 0.4, "c": 0.4}}
    assert relative_scores(table, benchmarks=["a"]) == pytest.approx({"full": 1.0, "icons": 1.2})
    assert relative_scores(table, benchmarks=["b", "c"]) == pytest.approx({"full": 1.0, "icons": 0.75})
    with pytest.raises(KeyError, match="'d'"):
        relative_scores(table, benchmarks=["a", "d"])


def test_chance_threshold_is_two_standard_errors_above_guessing():
    # yes/no on 40 records: 0.5 + 2 sqrt(0.25 / 40)
    assert chance_threshold(0.5, 40) == pytest.approx(0.5 + 2 * 0.0790569, abs=1e-6)
    # four options on 40 records: 0.25 + 2 sqrt(0.1875 / 40) = 0.3869
    assert chance_threshold(0.25, 40) == pytest.approx(0.386931, abs=1e-6)
    assert chance_threshold(0.25, 400) < chance_threshold(0.25, 40)  # more records, tighter


def test_informative_benchmarks_leave_out_a_full_model_at_chance():
    full = {"yes_no": 0.5, "mc": 0.45, "mc_barely": 0.375, "long": 0.7, "nothing": 0.0}
    chance = {"yes_no": 0.5, "mc": 0.25, "mc_barely": 0.25, "long": None, "nothing": None}
    n = dict.fromkeys(full, 40)
    used, excluded = informative_benchmarks(full, chance, n)
    # mc 0.45 > 0.387 counts; 0.375 does not (a guesser reaches it ~3% of the time)
    assert used == ["long", "mc"]
    assert sorted(excluded) == ["mc_barely", "nothing", "yes_no"]
    assert "chance 0.500" in excluded["yes_no"] and "n = 40" in excluded["yes_no"]
    assert "scores 0" in excluded["nothing"]
    # with ten times the records the same 0.375 is no longer luck
    used, _ = informative_benchmarks(full, chance, dict.fromkeys(full, 400))
    assert "mc_barely" in used and "yes_no" not in used


def test_results_markdown_with_both_rel_columns():
    table = {"full": {"a": 0.5, "b": 0.8}, "icons": {"a": 0.6, "b": 0.4}}
    text = results_markdown(table, relative_scores(table, benchmarks=["a"]), ["a", "b"], rel_all=relative_scores(table))
    lines = text.splitlines()
    assert lines[0] == "| Method | a | b | Rel. (%) | Rel. all (%) |"
    assert lines[1] == "|---|---:|---:|---:|---:|"
    assert lines[3] == "| icons | 0.600 | 0.400 | 120.0 | 85.0 |"
    # more columns after both Rel.: a method without a cell gets "–"
    columns = {"Δ Rel. vs random (95% CI)": {"icons": "+3.1 (+0.4, +5.9)"}}
    lines = results_markdown(table, {}, ["a"], rel_all=relative_scores(table), columns=columns).splitlines()
    assert lines[0] == "| Method | a | Rel. (%) | Rel. all (%) | Δ Rel. vs random (95% CI) |"
    assert lines[1] == "|---|---:|---:|---:|---:|"
    assert lines[2] == "| full | 0.500 | – | 100.0 | – |"
    assert lines[3] == "| icons | 0.600 | – | 85.0 | +3.1 (+0.4, +5.9) |"


def test_results_markdown():
    table = {"full": {"a": 0.5, "b": 0.8}, "icons": {"a": 0.6, "b": 0.4}}
    text = results_markdown(table, relative_scores(table), ["a", "b"])
    lines = text.splitlines()
    assert lines[0] == "| Method | a | b | Rel. (%) |"
    assert lines[2] == "| full | 0.500 | 0.800 | 100.0 |"
    assert lines[3] == "| icons | 0.600 | 0.400 | 85.0 |"


def test_evaluation_does_not_import_dagster():
    code = "import sys, icons_dagster.core.evaluation.metrics; assert 'dagster' not in sys.modules, 'dagster imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
