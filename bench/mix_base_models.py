"""The mix world's base-model attempts and their registered pre-check (docs/preregistration-mix.md).

The pre-check asks, before any fine-tune, whether a language model can answer the closed
formats (yes/no, multiple choice) from a description written where the image would be:
held-out texts of ``generate_mix_texts`` (seed 3001), scored by the likelihood of each
candidate answer, as the benchmarks are. A model that cannot answer from text cannot
answer from an image.

    python bench/mix_base_models.py --attempt 4 --dir D [--heldout 1000]
        builds that attempt's base model under D (folders reused when unchanged) and prints
        the closed-format accuracy after each text phase and after the caption alignment;
    python bench/mix_base_models.py --model M [--heldout 200]
        measures one checkpoint (the pilots: ``icons-dagster align --train lm`` on
        ``generate_mix_texts(..., formats=("yes_no", "mc"))``).

Attempt 2 and 3's numbers used 200 held-out texts (about 50 per closed format), 4 and 5's
1,000 (250 each). One thread; minutes per checkpoint on the 2-core VM.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from icons_dagster.core.data.records import load_records
from icons_dagster.core.evaluation.metrics import answer_log_likelihoods
from icons_dagster.core.model.alignment import REPORT_FILE, load_model
from icons_dagster.core.model.encoding import ConversationEncoder
from icons_dagster.demo.mix import TEXT_FORMATS, TEXTS_FILE, generate_mix_texts
from icons_dagster.demo.stage1 import MIX_TEXT_PHASES, TEXT_HELDOUT_SEED, CaptionAlignment, TextPhase, ensure_mix_model
from icons_dagster.demo.tiny_model import TinyModelSpec

CLOSED = {"yes_no": ["Yes", "No"], "mc": list("ABCD")}
CLOSED_FORMATS = ("yes_no", "mc")
CLOSED_PHASE = TextPhase("closed", CLOSED_FORMATS, {"mix": 80000}, {"mix": 20000}, 1e-3)
#: attempt -> (tiny spec, text phases, the caption alignment); change log entries
ATTEMPTS = {
    2: (TinyModelSpec(), MIX_TEXT_PHASES, CaptionAlignment()),
    3: (TinyModelSpec(text_hidden=256, intermediate=512), MIX_TEXT_PHASES, CaptionAlignment()),
    4: (TinyModelSpec(), (CLOSED_PHASE, TextPhase("text", TEXT_FORMATS, {"mix": 8000}, {"mix": 4000}, 1e-3)), CaptionAlignment()),
    5: (TinyModelSpec(), (CLOSED_PHASE, TextPhase("text80k", TEXT_FORMATS, {"mix": 80000}, {"mix": 4000}, 1e-3)), CaptionAlignment("projector")),
    6: (
        TinyModelSpec(),
        (CLOSED_PHASE, TextPhase("text80k-record", TEXT_FORMATS, {"mix": 80000}, {"mix": 4000}, 1e-3, loss_mean="record")),
        CaptionAlignment(loss_mean="record", rehearsal_formats=CLOSED_FORMATS, rehearsal_drafts=16000),
    ),
}


def closed_format_accuracy(model_dir: Path, texts_dir: Path) -> dict[str, tuple[float, int]]:
    """format -> (accuracy, texts): the most likely candidate answer against the reference."""
    torch.set_num_threads(1)
    processor, model, placement = load_model(model_dir)
    encoder = ConversationEncoder(processor, 512)
    formats = {r["id"]: r["format"] for r in json.loads((texts_dir / TEXTS_FILE).read_text(encoding="utf-8"))}
    hits: dict[str, list[bool]] = collections.defaultdict(list)
    for record in load_records(texts_dir / TEXTS_FILE, texts_dir).records:
        if (candidates := CLOSED.get(formats[record.id])) is not None:
            best = candidates[int(answer_log_likelihoods(model, encoder, placement, record, candidates).argmax())]
            hits[formats[record.id]].append(best == record.turns[-1].text)
    return {f: (round(sum(h) / len(h), 3), len(h)) for f, h in sorted(hits.items())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--attempt", type=int, choices=sorted(ATTEMPTS))
    which.add_argument("--model", type=Path)
    parser.add_argument("--dir", type=Path, default=Path("bench_out/mix_base_models"), help="where an attempt's folders go")
    parser.add_argument("--heldout", type=int, default=1000, help="held-out texts (200 or 1,000 in the reported runs)")
    args = parser.parse_args()
    texts = generate_mix_texts(args.dir / f"precheck-texts-{args.heldout}", args.heldout, seed=TEXT_HELDOUT_SEED)
    if args.model is not None:
        print(args.model, closed_format_accuracy(args.model, texts))
        return
    spec, phases, alignment = ATTEMPTS[args.attempt]
    aligned = ensure_mix_model(args.dir, "mix", spec=spec, text_phases=phases, alignment=alignment)
    chain, source = [], aligned
    while (source / REPORT_FILE).is_file():  # aligned <- last text phase <- ... <- the random model
        chain.append(source)
        source = Path(json.loads((source / REPORT_FILE).read_text(encoding="utf-8"))["model"])
    for model_dir in reversed(chain):
        report = json.loads((model_dir / REPORT_FILE).read_text(encoding="utf-8"))
        print(model_dir.name, "closed formats from text:", closed_format_accuracy(model_dir, texts), "held-out loss:", report["heldout"])


if __name__ == "__main__":
    main()
