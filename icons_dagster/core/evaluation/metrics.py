"""Scoring a fine-tuned model on each benchmark's test split (no Dagster here).

Why not greedy exact match everywhere: a small or briefly tuned model decodes
multiple-choice questions to one letter whatever the options, and a free-form
description never equals its reference, so exact match says "0" or "25%" about
models that differ a lot. Instead:

* closed-form answers (yes/no, option letters, a benchmark's closed set of short
  answers) are scored by the likelihood of each candidate answer given the question
  and image; the prediction is the most likely candidate (ties: the first listed);
* long answers are scored by the token F1 of a greedy generation against the
  reference;
* every benchmark also reports the reference answers' mean per-token NLL
  (``reference_loss``), a smooth signal that still moves when accuracies are flat;
* a model whose predictions collapse to one answer (while the references do not) is
  flagged, so a suspicious accuracy is not read as skill;
* each closed-form score comes with its chance level (the expected score of guessing
  uniformly among the candidates), so Rel. can leave out the benchmarks where even the
  full-data model does not beat guessing (``informative_benchmarks``).

Log-likelihoods count the answer's tokens and the end-of-turn token the chat template
puts after it (so "Yes" and "Yes, it is" are told apart). Only the LAST assistant turn
is scored; earlier answers of a multi-turn record are context.

Cost: one forward pass per (record, candidate). A short-answer benchmark with a large
open answer set (TextVQA, GQA) would need thousands of candidates per record; above
``max_candidates`` it is scored by greedy exact match instead, and ``extra`` says so.
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from statistics import median

import numpy as np
import torch

from icons_dagster.core.model.encoding import IGNORE_INDEX, ConversationEncoder, EncodedSample, EncodingError, collate, per_sample_loss
from icons_dagster.core.data.records import ImageLoadError, Record, Turn, load_image
from icons_dagster.core.model.loading import scoring_mode
from icons_dagster.core.model.samples import SkipLog

__all__ = [
    "ANSWER_KINDS",
    "KINDS",
    "AnswerKind",
    "BenchmarkScore",
    "answer_log_likelihoods",
    "candidate_answers",
    "collapsed",
    "greedy_answer",
    "infer_kind",
    "informative_benchmarks",
    "normalize_answer",
    "question_options",
    "relative_scores",
    "results_markdown",
    "score_benchmark",
    "token_f1",
]

LONG_ANSWER_WORDS = 5  # median reference length (words) above which a benchmark is free-form
_TRAILING_PUNCTUATION = ".,;:!?\"'"
_OPTION_LINE = re.compile(r"^\s*(?:\(([A-H])\)|([A-H])[.)])\s*\S")
_LETTER_ANSWER = re.compile(r"^\s*(?:\(([A-Ha-h])\)|([A-Ha-h])[.)]?)\s*$")

Progress = Callable[[int, int], None]


# -- text ---------------------------------------------------------------------------------


def normalize_answer(text: str) -> str:
    """Lowercase, strip, drop trailing punctuation, collapse whitespace ("Yes." == "yes")."""
    text = " ".join(str(text).lower().split())
    return text.rstrip(_TRAILING_PUNCTUATION).strip()


_ARTICLES = frozenset({"a", "an", "the"})


def _f1_tokens(text: str) -> list[str]:
    """Normalized words without punctuation or articles (as SQuAD: descriptions share many)."""
    tokens = (token.strip(string.punctuation) for token in normalize_answer(text).split())
    return [token for token in tokens if token and token not in _ARTICLES]


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD-style bag-of-tokens F1 (articles removed); both empty: 1.0, one empty: 0.0."""
    predicted, expected = _f1_tokens(prediction), _f1_tokens(reference)
    if not predicted or not expected:
        return float(predicted == expected)
    common = sum((Counter(predicted) & Counter(expected)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(predicted), common / len(expected)
    return 2 * precision * recall / (precision + recall)


def _option_letter(answer: str) -> str | None:
    """"C", "(C)", "C." or "C)" -> "C"; anything else -> None."""
    match = _LETTER_ANSWER.match(answer)
    if match is None:
        return None
    return (match.group(1) or match.group(2)).upper()


def question_options(question: str) -> list[str]:
    """Option letters listed one per line ("A. red", "(B) red", "C) red"), in order, once each."""
    letters: list[str] = []
    for line in question.splitlines():
        match = _OPTION_LINE.match(line)
        if match is not None:
            letter = match.group(1) or match.group(2)
            if letter not in letters:
                letters.append(letter)
    return letters


def _reference(record: Record) -> str:
    return record.turns[-1].text


def _question(record: Record) -> str:
    return record.turns[-2].text if len(record.turns) >= 2 else ""


def infer_kind(records: Sequence[Record]) -> str:
    """The answer format of a split, from the last answer of each record (see ``KINDS``)."""
    if not records:
        raise ValueError("cannot infer the answer kind of an empty split")
    references = [_reference(r) for r in records]
    if all(normalize_answer(a) in {"yes", "no"} for a in references):
        return "yes_no"
    if all(_option_letter(a) is not None for a in references) and all(len(question_options(_question(r))) >= 2 for r in records):
        return "multiple_choice"
    if median(len(a.split()) for a in references) > LONG_ANSWER_WORDS:
        return "long_answer"
    return "short_answer"


def _cased_like(word: str, reference: str) -> str:
    stripped = reference.strip()
    if stripped.isupper() and len(stripped) > 1:
        return word.upper()
    if stripped.islower():
        return word.lower()
    return word.capitalize()


def _yes_no_candidates(record: Record, answer_set: Sequence[str]) -> list[str]:
    """"Yes"/"No" cased like the reference."""
    return [_cased_like("yes", _reference(record)), _cased_like("no", _reference(record))]


def _option_candidates(record: Record, answer_set: Sequence[str]) -> list[str]:
    """The question's option letters in the reference's style ("(A)" when it answers "(C)")."""
    letters = question_options(_question(record))
    if not letters:
        raise ValueError(f"record {record.id}: multiple-choice question lists no options")
    reference = _reference(record).strip()
    letter = _option_letter(reference)
    if letter is None:
        return letters
    at = reference.upper().index(letter)
    case = str.lower if reference[at].islower() else str.upper
    return [reference[:at] + case(option) + reference[at + 1 :] for option in letters]


def _answer_set_candidates(record: Record, answer_set: Sequence[str]) -> list[str]:
    """The benchmark's answer set as given (sorted distinct references of the split)."""
    if not answer_set:
        raise ValueError("short_answer candidates need the benchmark's answer set")
    return list(answer_set)


def _same_normalized(prediction: str, reference: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(reference))


def _same_letter(prediction: str, reference: str) -> float:
    letter = _option_letter(prediction)
    return float(letter is not None and letter == _option_letter(reference))


@dataclass(frozen=True)
class AnswerKind:
    """How one answer format is scored: its metric, the candidates a closed format is
    scored over by likelihood (None: free-form, scored on a greedy answer), and the score
    of one prediction against its reference."""

    metric: str
    score: Callable[[str, str], float]
    candidates: Callable[[Record, Sequence[str]], list[str]] | None = None
    uses_answer_set: bool = False  # candidates are the split's distinct references


#: The answer formats, in the order ``infer_kind`` tries them. A benchmark's folder may
#: declare its format (``benchmark.json``: {"answers": <kind>}); otherwise it is inferred.
ANSWER_KINDS = {
    "yes_no": AnswerKind("accuracy", _same_normalized, _yes_no_candidates),
    "multiple_choice": AnswerKind("accuracy", _same_letter, _option_candidates),
    "short_answer": AnswerKind("exact_match", _same_normalized, _answer_set_candidates, uses_answer_set=True),
    "long_answer": AnswerKind("token_f1", token_f1),
}
KINDS = tuple(ANSWER_KINDS)
METRICS = {kind: answers.metric for kind, answers in ANSWER_KINDS.items()}


def answer_kind(kind: str, source: str = "") -> AnswerKind:
    if kind not in ANSWER_KINDS:
        raise ValueError(f"{source + ': ' if source else ''}unknown answer kind {kind!r}; choose from {list(KINDS)}")
    return ANSWER_KINDS[kind]


def candidate_answers(kind: str, record: Record, answer_set: Sequence[str] = ()) -> list[str]:
    """The closed set scored by likelihood, written in the reference's own format."""
    candidates = answer_kind(kind).candidates
    if candidates is None:
        raise ValueError(f"no candidate answers for kind {kind!r} (closed-form kinds: {[k for k, a in ANSWER_KINDS.items() if a.candidates]})")
    return candidates(record, answer_set)


# -- model --------------------------------------------------------------------------------


def _record_image(record: Record):
    return load_image(record.image_path) if record.image_path is not None else None


def _last_answer_only(sample: EncodedSample) -> EncodedSample:
    """Labels on the last contiguous labelled run only (the final answer); earlier answers are context."""
    labelled = (sample.labels != IGNORE_INDEX).nonzero().flatten()
    if labelled.numel() == 0:
        raise EncodingError("no answer tokens")
    positions = labelled.tolist()
    start = positions[-1]
    for position in reversed(positions[:-1]):
        if position != start - 1:
            break
        start = position
    labels = torch.full_like(sample.labels, IGNORE_INDEX)
    labels[start:] = sample.labels[start:]
    n_answer = int((labels[1:] != IGNORE_INDEX).sum())
    return replace(sample, labels=labels, n_answer_tokens=n_answer)


def _with_answer(record: Record, answer: str) -> tuple[Turn, ...]:
    return record.turns[:-1] + (Turn("gpt", answer),)


def _answer_samples(encoder: ConversationEncoder, record: Record, answers: Sequence[str], image) -> list[EncodedSample]:
    """The record with each answer as its last turn, labelled on that answer only."""
    samples = []
    for answer in answers:
        sample = encoder.encode(record.id, _with_answer(record, answer), image)
        if sample.truncated:
            raise EncodingError(f"the record with answer {answer!r} is longer than {encoder.max_length} tokens; its likelihood would be partial")
        samples.append(_last_answer_only(sample))
    return samples


def _answer_nll(model, encoder: ConversationEncoder, placement, record: Record, answers: Sequence[str], image, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Summed NLL of each answer as the record's last turn, and its number of target tokens."""
    return _samples_nll(model, encoder, placement, _answer_samples(encoder, record, answers, image), batch_size)


def _samples_nll(model, encoder: ConversationEncoder, placement, samples: Sequence[EncodedSample], batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Summed NLL of each sample's labelled tokens and their number, ``batch_size`` samples a forward."""
    sums = np.empty(len(samples), dtype=np.float64)
    counts = np.empty(len(samples), dtype=np.int64)
    pad_id = encoder.tokenizer.pad_token_id
    with scoring_mode(model):
        for start in range(0, len(samples), batch_size):
            batch = collate(samples[start : start + batch_size], pad_id)
            with placement.forward_context():
                logits = model(**batch.model_inputs(placement.device, placement.dtype)).logits
            n_tokens = (batch.labels[:, 1:] != IGNORE_INDEX).sum(dim=1)
            losses = per_sample_loss(logits, batch.labels).double().cpu()
            sums[start : start + len(losses)] = (losses * n_tokens.double()).numpy()
            counts[start : start + len(losses)] = n_tokens.numpy()
    return sums, counts


def answer_log_likelihoods(model, encoder: ConversationEncoder, placement, record: Record, candidates: Sequence[str], batch_size: int = 16, *, image=None) -> np.ndarray:
    """log p(candidate | conversation up to the last answer, image), summed over its tokens (float64).

    ``image``: the record's decoded image, to avoid decoding it again (loaded when None).
    Raises ImageLoadError / EncodingError for a record that cannot be scored.
    """
    if not candidates:
        raise ValueError("no candidate answers to score")
    if image is None:
        image = _record_image(record)
    sums, _ = _answer_nll(model, encoder, placement, record, candidates, image, batch_size)
    return -sums


def _prompt(encoder: ConversationEncoder, record: Record, image) -> str:
    """The conversation up to the last question, rendered for generation; EncodingError when too long."""
    prompt = encoder.render(encoder.messages(record.turns[:-1], has_image=image is not None), add_generation_prompt=True)
    inputs = encoder.processor(text=prompt, images=[image], return_tensors="pt") if image is not None else encoder.processor(text=prompt, return_tensors="pt")
    n_prompt = inputs["input_ids"].shape[1]
    if n_prompt > encoder.max_length:
        raise EncodingError(f"the prompt has {n_prompt} tokens, more than max_length {encoder.max_length}")
    return prompt


def _generate(model, encoder: ConversationEncoder, placement, prompts: Sequence[str], images: Sequence | None, max_new_tokens: int) -> list[str]:
    """Greedy continuations of prompts (all with an image, or none), left-padded into one batch."""
    tokenizer = encoder.tokenizer
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # every prompt ends where generation starts
    try:
        kwargs = {"images": list(images)} if images is not None else {}
        inputs = encoder.processor(text=list(prompts), return_tensors="pt", padding=True, **kwargs)
    finally:
        tokenizer.padding_side = side
    model_inputs = {}
    for key, value in inputs.items():
        if isinstance(value, torch.Tensor):
            value = value.to(placement.device)
            model_inputs[key] = value.to(placement.dtype) if value.is_floating_point() else value
    n_prompt = inputs["input_ids"].shape[1]
    with scoring_mode(model), placement.forward_context():
        output = model.generate(**model_inputs, do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id)
    sequences = output if isinstance(output, torch.Tensor) else output.sequences
    return [tokenizer.decode(row[n_prompt:], skip_special_tokens=True).strip() for row in sequences]


def greedy_answer(model, encoder: ConversationEncoder, placement, record: Record, max_new_tokens: int = 64, *, image=None) -> str:
    """The model's greedy continuation after the record's last question (special tokens dropped)."""
    if image is None:
        image = _record_image(record)
    prompt = _prompt(encoder, record, image)
    return _generate(model, encoder, placement, [prompt], [image] if image is not None else None, max_new_tokens)[0]


def greedy_answers(model, encoder: ConversationEncoder, placement, prompts: Sequence[str], images: Sequence, max_new_tokens: int = 64, batch_size: int = 8) -> list[str]:
    """Greedy continuations of ``_prompt`` outputs, ``batch_size`` prompts a generation
    (prompts with an image and without are batched apart)."""
    answers: list[str] = [""] * len(prompts)
    for with_image in (True, False):
        positions = [i for i, image in enumerate(images) if (image is not None) == with_image]
        for start in range(0, len(positions), batch_size):
            chunk = positions[start : start + batch_size]
            chunk_images = [images[i] for i in chunk] if with_image else None
            for i, answer in zip(chunk, _generate(model, encoder, placement, [prompts[i] for i in chunk], chunk_images, max_new_tokens)):
                answers[i] = answer
    return answers


# -- scores -------------------------------------------------------------------------------


@dataclass
class BenchmarkScore:
    benchmark: str
    kind: str
    metric: str  # "accuracy", "exact_match" or "token_f1"
    score: float  # in [0, 1]
    n: int  # records scored
    n_skipped: int
    reference_loss: float  # mean per-token NLL of the reference answers (token-weighted over the split)
    prediction_counts: dict[str, int] = field(default_factory=dict)  # normalized prediction -> count, top 10
    collapsed: bool = False
    # expected score of a uniform guess among the candidates (mean over records of
    # 1 / #candidates); None where scoring is not a choice (greedy exact match, token F1)
    chance: float | None = None
    extra: dict = field(default_factory=dict)
    # record id -> its score (0/1, or token F1), in split order, skipped records absent:
    # what the paired bootstrap of Rel. resamples (``statistics.bootstrap_rel_differences``)
    record_scores: dict[str, float] = field(default_factory=dict)


def _top_share(values: Sequence[str]) -> float:
    if not values:
        return 0.0
    return Counter(normalize_answer(v) for v in values).most_common(1)[0][1] / len(values)


def collapsed(predictions: Sequence[str], threshold: float = 0.8, *, references: Sequence[str] | None = None, margin: float = 0.2) -> bool:
    """True when one normalized prediction takes >= ``threshold`` of them AND more than the
    references' own most common answer plus ``margin`` (a split that is 90% "Yes" is not a
    collapse when the model says "Yes" 90% of the time). Without references only the threshold counts.
    """
    if not predictions:
        return False
    share = _top_share(predictions)
    reference_share = _top_share(references) if references else 0.0
    return share >= threshold and share > reference_share + margin


def score_benchmark(
    model,
    encoder: ConversationEncoder,
    placement,
    name: str,
    records: Sequence[Record],
    skips: SkipLog | None = None,
    progress: Progress | None = None,
    max_new_tokens: int = 64,
    *,
    batch_size: int = 16,
    max_candidates: int = 64,
    kind: str | None = None,
) -> BenchmarkScore:
    """Score one benchmark split (see the module docstring for the metric of each kind).

    ``kind``: the answer format the benchmark declares (``ANSWER_KINDS``); None infers it.
    Records whose image cannot be decoded or that cannot be encoded are skipped and added
    to ``skips`` (and listed in ``extra["skipped"]``); a split with nothing scorable raises.
    """
    skips = skips if skips is not None else SkipLog()
    kind = kind or infer_kind(records)
    answers = answer_kind(kind, f"benchmark {name}")
    references_all = [_reference(r) for r in records]
    answer_set = sorted(set(references_all)) if answers.uses_answer_set else []
    by_likelihood = answers.candidates is not None and len(answer_set) <= max_candidates
    metric = answers.metric
    extra: dict = {"scored_by": "likelihood" if by_likelihood else "greedy"}
    if answers.uses_answer_set:
        extra["answer_set_size"] = len(answer_set)

    skipped: list[dict] = []
    predictions: list[str] = []
    references: list[str] = []
    scores: dict[str, float] = {}
    guess_odds: list[float] = []
    nll_sum, nll_tokens = 0.0, 0
    # Records are scored a chunk at a time: every answer likelihood of the chunk in forwards of
    # ``batch_size`` samples, and its greedy answers in generations of ``batch_size`` prompts
    # (per-record forwards leave a small model waiting on Python, not arithmetic).
    for start in range(0, len(records), batch_size):
        prepared = []  # (record, reference, candidates, texts, samples, image, prompt)
        for record in records[start : start + batch_size]:
            reference = _reference(record)
            try:
                image = _record_image(record)
                candidates, prompt = None, None
                if by_likelihood:
                    candidates = candidate_answers(kind, record, answer_set)
                    texts = list(candidates) if reference in candidates else [*candidates, reference]
                else:
                    texts = [reference]
                    prompt = _prompt(encoder, record, image)
                prepared.append((record, reference, candidates, texts, _answer_samples(encoder, record, texts, image), image, prompt))
            except (ImageLoadError, EncodingError) as error:
                skips.add(record.id, str(error))
                skipped.append({"id": record.id, "reason": str(error)})
        sums, counts = _samples_nll(model, encoder, placement, [sample for item in prepared for sample in item[4]], batch_size)
        greedy = [] if by_likelihood else greedy_answers(model, encoder, placement, [item[6] for item in prepared], [item[5] for item in prepared], max_new_tokens, batch_size)
        offset = 0
        for k, (record, reference, candidates, texts, _, _, _) in enumerate(prepared):
            record_sums, record_counts = sums[offset : offset + len(texts)], counts[offset : offset + len(texts)]
            offset += len(texts)
            if by_likelihood:
                at = texts.index(reference)
                prediction = candidates[int(np.argmax(-record_sums[: len(candidates)]))]
                guess_odds.append(1.0 / len(candidates))
            else:
                at, prediction = 0, greedy[k]
            predictions.append(prediction)
            references.append(reference)
            scores[record.id] = float(answers.score(prediction, reference))
            nll_sum += float(record_sums[at])
            nll_tokens += int(record_counts[at])
        if progress is not None:
            progress(min(start + batch_size, len(records)), len(records))

    if not scores:
        first = "; ".join(f"{s['id']}: {s['reason']}" for s in skipped[:3])
        raise ValueError(f"benchmark {name}: no record could be scored ({len(skipped)} skipped, e.g. {first})")
    counts_top = dict(Counter(normalize_answer(p) for p in predictions).most_common(10))
    extra["skipped"] = skipped[:50]
    extra["reference_top_share"] = _top_share(references)
    extra["prediction_top_share"] = _top_share(predictions)
    return BenchmarkScore(
        benchmark=name,
        kind=kind,
        metric=metric,
        score=float(np.mean(list(scores.values()))),
        n=len(scores),
        n_skipped=len(skipped),
        reference_loss=nll_sum / max(nll_tokens, 1),
        prediction_counts=counts_top,
        collapsed=collapsed(predictions, references=references),
        chance=float(np.mean(guess_odds)) if by_likelihood else None,
        extra=extra,
        record_scores=scores,
    )


# -- tables -------------------------------------------------------------------------------


# How far above chance the full-data model must score for a benchmark to enter Rel.: Z
# standard errors of a guessing model's accuracy on the same number of records (one-sided,
# a guesser passes about 2% of the time).
INFORMATIVE_Z = 2.0


def chance_threshold(chance: float, n: int, z: float = INFORMATIVE_Z) -> float:
    """The score a guessing model stays below (but for ~2% of the time at z = 2) on ``n`` records."""
    return chance + z * math.sqrt(chance * (1.0 - chance) / max(n, 1))


def informative_benchmarks(
    full_scores: dict[str, float],
    chance: dict[str, float | None],
    n: dict[str, int],
    z: float = INFORMATIVE_Z,
) -> tuple[list[str], dict[str, str]]:
    """Benchmarks on which the full-data model beats guessing, and why each other one does not.

    A benchmark without a chance level (greedy exact match, token F1) counts when the full
    score is above 0. Why: a ratio to a full-data score that is itself chance divides noise
    by noise (on the large demo pool one random subset scored 233% of full that way).
    """
    used: list[str] = []
    excluded: dict[str, str] = {}
    for name in sorted(full_scores):
        score, level = full_scores[name], chance.get(name)
        if level is None:
            if score > 0:
                used.append(name)
            else:
                excluded[name] = "the full-data model scores 0"
            continue
        threshold = chance_threshold(level, n[name], z)
        if score > threshold:
            used.append(name)
        else:
            excluded[name] = f"full {score:.3f} <= chance {level:.3f} + {z:g} s.e. = {threshold:.3f} (n = {n[name]})"
    return used, excluded


def relative_scores(table: dict[str, dict[str, float]], full: str = "full", benchmarks: Sequence[str] | None = None) -> dict[str, float]:
    """ICONS eq. 2: Rel(m) = mean over benchmarks b of score(m, b) / score(full, b), as a fraction.

    The benchmarks are ``benchmarks`` (e.g. the informative ones), by default those of the
    ``full`` row; one where the full-data model scores 0 has no defined ratio and is left
    out of every method's mean. A method missing one of the used benchmarks raises
    KeyError, as does a table without the ``full`` row.
    """
    if full not in table:
        raise KeyError(f"no {full!r} row in the results table (methods: {sorted(table)}); relative scores need the full-data model")
    names = table[full] if benchmarks is None else benchmarks
    unknown = [b for b in names if b not in table[full]]
    if unknown:
        raise KeyError(f"the {full!r} row has no score for benchmark(s) {unknown}")
    used = [b for b in names if table[full][b] != 0]
    if not used:
        raise ValueError(f"the {full!r} row scores 0 on every benchmark used; no relative score is defined")
    rel: dict[str, float] = {}
    for method, row in table.items():
        missing = [b for b in used if b not in row]
        if missing:
            raise KeyError(f"method {method!r} has no score for benchmark(s) {missing}")
        rel[method] = float(np.mean([row[b] / table[full][b] for b in used]))
    return rel


def results_markdown(
    table: dict[str, dict[str, float]],
    rel: dict[str, float],
    benchmarks: Sequence[str],
    rel_all: dict[str, float] | None = None,
    columns: Mapping[str, Mapping[str, str]] | None = None,
) -> str:
    """One row per method, one column per benchmark (3 decimals), and Rel. in percent (1 decimal).

    ``rel_all``: a second Rel. column over every benchmark (the paper's eq. 2 as written),
    beside ``rel`` over the informative ones. ``columns``: more columns after them, header
    -> {method: cell text} (a method without a cell gets "–").
    """

    def cell(value: float | None, fmt: str) -> str:
        return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, fmt)

    def percent(values: dict[str, float], method: str) -> str:
        value = values.get(method)
        return cell(None if value is None else 100 * value, ".1f")

    columns = columns or {}
    extra = " Rel. all (%) |" if rel_all is not None else ""
    extra += "".join(f" {header} |" for header in columns)
    lines = [
        "| Method | " + " | ".join(benchmarks) + " | Rel. (%) |" + extra,
        "|---|" + "---:|" * (len(benchmarks) + 1 + (rel_all is not None) + len(columns)),
    ]
    for method, row in table.items():
        scores = [cell(row.get(b), ".3f") for b in benchmarks]
        line = f"| {method} | " + " | ".join(scores) + f" | {percent(rel, method)} |"
        if rel_all is not None:
            line += f" {percent(rel_all, method)} |"
        line += "".join(f" {cells.get(method, '–')} |" for cells in columns.values())
        lines.append(line)
    return "\n".join(lines)
