"""Scoring the test splits: chunks of records batched into forwards and generations, against
one record at a time, in the same run (issue 18 item 6: the evaluation's time goes here).

    python bench/scoring.py --home H [--adapter DIR] [--benchmarks a,b] [--threads 2]

Reads the home's icons.json (model, benchmarks folder, image root, max_new_tokens), loads the
model once and scores each benchmark's test split two ways: the loop before batching (per
record: one forward over its candidate answers, or over its reference and then one
generation; ``one_at_a_time`` below) and ``score_benchmark`` (16 records a chunk), and
checks that both give every record the same score. Prints seconds per benchmark and the ratio.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch

from icons_dagster.core.data.benchmarks import declared_answers, load_benchmark
from icons_dagster.core.data.records import split_file
from icons_dagster.core.evaluation.metrics import (
    _answer_nll, _record_image, _reference, answer_kind, candidate_answers, greedy_answer, infer_kind, score_benchmark,
)  # fmt: skip
from icons_dagster.core.model.cache import ModelCache
from icons_dagster.resources.home import read_home_config

BATCHED = 16


def one_at_a_time(model, encoder, placement, records, kind, max_new_tokens: int) -> dict[str, float]:
    """Each record's score as the evaluation computed it before batching."""
    kind = kind or infer_kind(records)
    answers = answer_kind(kind)
    answer_set = sorted({_reference(r) for r in records}) if answers.uses_answer_set else []
    by_likelihood = answers.candidates is not None and len(answer_set) <= 64
    scores = {}
    for record in records:
        reference, image = _reference(record), _record_image(record)
        if by_likelihood:
            candidates = candidate_answers(kind, record, answer_set)
            texts = list(candidates) if reference in candidates else [*candidates, reference]
            sums, _ = _answer_nll(model, encoder, placement, record, texts, image, 16)
            prediction = candidates[int(np.argmax(-sums[: len(candidates)]))]
        else:
            _answer_nll(model, encoder, placement, record, [reference], image, 16)  # the reference loss, as before
            prediction = greedy_answer(model, encoder, placement, record, max_new_tokens, image=image)
        scores[record.id] = float(answers.score(prediction, reference))
    return scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--home", type=Path, required=True)
    parser.add_argument("--benchmarks", help="comma-separated names (default: every benchmark with a test split)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--adapter", type=Path, help="a fine-tuned adapter folder to score with (a fine-tuned model writes longer answers than the base)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = read_home_config(args.home)
    folder, root = config.data.benchmarks_path(), config.data.image_root_path()
    names = args.benchmarks.split(",") if args.benchmarks else sorted(p.name for p in folder.iterdir() if split_file(p, "test"))
    models = ModelCache()
    with models.with_adapter(config.model, args.adapter) if args.adapter else contextlib.nullcontext(models.get(config.model)[1]) as model:
        _score_all(models, model, config, folder, root, names, args)


def _score_all(models, model, config, folder, root, names, args) -> None:
    placement, encoder = models.get(config.model)[2], models.encoder(config.model)
    print(f"model {config.model.name_or_path} (adapter {args.adapter}), {args.threads} threads, max_new_tokens {config.evaluation.max_new_tokens}")
    print("| benchmark | records | scored by | one at a time (s) | batched 16 (s) | ratio | same scores |\n|---|---|---|---|---|---|---|")
    totals = [0.0, 0.0]
    for name in names:
        records = load_benchmark(folder, name, root, split="test").records
        kind = declared_answers(folder / name)
        started = time.perf_counter()
        before = one_at_a_time(model, encoder, placement, records, kind, config.evaluation.max_new_tokens)
        t1 = time.perf_counter() - started
        started = time.perf_counter()
        result = score_benchmark(model, encoder, placement, name, records, max_new_tokens=config.evaluation.max_new_tokens, batch_size=BATCHED, kind=kind)
        t2 = time.perf_counter() - started
        totals[0] += t1
        totals[1] += t2
        same = before == result.record_scores
        print(f"| {name} | {len(records)} | {result.extra['scored_by']} | {t1:.1f} | {t2:.1f} | {t1 / t2:.2f}x | {'yes' if same else 'NO'} |")
    print(f"| all | | | {totals[0]:.1f} | {totals[1]:.1f} | {totals[0] / totals[1]:.2f}x | |")


if __name__ == "__main__":
    main()
