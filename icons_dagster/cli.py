"""``icons-dagster``: run the asset graph, validate data, open the UI.

The CLI writes the home's ``icons.json`` and launches the same assets through Dagster on
the home's persistent instance; it never computes anything on a second code path. ``align``
prepares a base checkpoint before any graph (stage-1 alignment, ``core/model/alignment.py``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

from icons_dagster.core.model.alignment import DEVICE_CHOICES, LOSS_MEANS, TRAIN_CHOICES, AlignmentRecipe
from icons_dagster.core.schema import SECTIONS, IconsConfig, field_types
from icons_dagster.core.storage.artifacts import ArtifactStore
from icons_dagster.demo.bootstrap import demo_sizes
from icons_dagster.resources.home import read_home_config, resolve_home

# The sections each command's flags set (generated from the section dataclasses' fields).
RUN_SECTIONS = ("data", "model", "lora", "warmup", "gradients", "influence", "selection", "embedder", "ofa")
EVALUATE_SECTIONS = ("evaluation",)


def _flag_type(annotation: Any):
    """How a flag's text becomes the field's JSON value."""
    if annotation in (int, float, str):
        return annotation
    if annotation == (str | None):
        return str
    if typing.get_origin(annotation) is tuple and typing.get_args(annotation) == (str, Ellipsis):
        return lambda text: [item for item in text.split(",") if item]
    return json.loads  # tuples, mappings and free-form values: JSON


def add_section_flags(parser: argparse.ArgumentParser, sections: tuple[str, ...]) -> None:
    """One flag per field of each section: ``--<section>-<field>`` (or the field's ``flag``)
    plus its ``aliases``, with its help, choices and default; the value lands in
    ``<section>.<field>`` and only flags given on the command line are set."""
    for section in sections:
        cls = SECTIONS[section]
        group = parser.add_argument_group(f"{section} settings", (cls.__doc__ or "").splitlines()[0])
        types = field_types(cls)
        for f in dataclasses.fields(cls):
            meta = f.metadata
            flag = meta.get("flag") or f"--{section}-{f.name}".replace("_", "-")
            default = f.default if f.default is not dataclasses.MISSING else None
            kwargs: dict[str, Any] = {"dest": f"{section}.{f.name}", "default": argparse.SUPPRESS, "metavar": f.name.upper()}
            kwargs["help"] = f"{meta.get('help', '')} (default: {default!r})".replace("%", "%%")
            if types[f.name] is bool:
                kwargs["action"] = argparse.BooleanOptionalAction
                del kwargs["metavar"]
            else:
                kwargs["type"] = _flag_type(types[f.name])
            if meta.get("choices"):
                kwargs["choices"] = list(meta["choices"])
                del kwargs["metavar"]
            group.add_argument(flag, *meta.get("aliases", ()), **kwargs)


def section_overrides(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """The section fields given on the command line; local paths made absolute."""
    overrides: dict[str, dict[str, Any]] = {}
    for key, value in vars(args).items():
        if "." not in key:
            continue
        section, name = key.split(".", 1)
        f = next(f for f in dataclasses.fields(SECTIONS[section]) if f.name == name)
        if f.metadata.get("path") and value:
            value = str(Path(value).expanduser().resolve())
        overrides.setdefault(section, {})[name] = value
    return overrides


def _progress_printer():
    from tqdm import tqdm

    bar = tqdm(total=1, unit="step", file=sys.stderr, dynamic_ncols=True)

    def on_step(index: int, total: int, step) -> None:
        bar.total = total
        bar.n = index
        bar.set_description(step.label[:60])
        bar.refresh()

    return bar, on_step


def _loss_bar(description: str):
    """A tqdm bar on stderr for a training loop's ``progress(step, steps, loss)`` callback."""
    from tqdm import tqdm

    bar = tqdm(total=1, unit="step", file=sys.stderr, dynamic_ncols=True, desc=description, disable=None)

    def progress(step: int, steps: int, loss: float) -> None:
        bar.total = steps
        bar.n = step
        bar.set_postfix(loss=f"{loss:.3f}")
        bar.refresh()

    return bar, progress


def _bootstrap_demo(home: Path, size: str, num_shards: int | None = None, world_seed: int = 0) -> IconsConfig:
    """The demo's inputs built under the home (stage 1 shown as it trains), and their config."""
    from icons_dagster.demo.bootstrap import bootstrap_demo

    bar, progress = _loss_bar("demo model: stage-1 alignment")
    try:
        return bootstrap_demo(home, size, num_shards, progress=progress, world_seed=world_seed)
    finally:
        bar.close()


def _methods(choice: str) -> tuple[str, ...]:
    return ("icons", "ofa") if choice == "both" else (choice,)


def _holding_home(command: str, home: Path, body: Callable[[], int], verbose: bool = False) -> int:
    """Run a command that writes the home: alone on it (a second one refuses, naming the
    first), with SIGTERM stopping it as Ctrl-C does (run_guard.py). A failure prints its
    one-line cause and a hint; the traceback only with ``--verbose`` (and always in the
    Dagster run's log)."""
    from icons_dagster.core.data.records import RecordFileError
    from icons_dagster.run_guard import HomeBusy, home_lock, raise_on_sigterm
    from icons_dagster.steps import StepFailed

    raise_on_sigterm()
    try:
        with home_lock(ArtifactStore(home).dagster_home, f"icons-dagster {command}"):
            return body()
    except HomeBusy as error:
        print(f"{command}: {error}", file=sys.stderr)
        return 3
    except (StepFailed, RecordFileError, ValueError, FileNotFoundError) as error:
        if verbose:
            raise
        print(f"{command}: {error}", file=sys.stderr)
        print(f"  hint: {_hint(str(error), home, getattr(error, 'run_id', None))}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"\n{command}: interrupted; what finished is kept and the next run on this home goes on from there", file=sys.stderr)
        return 130


def _hint(message: str, home: Path, run_id: str | None) -> str:
    """What to do next, from what went wrong."""
    if "selects nothing" in message:
        return "raise --p, or add records: the subset must hold at least one"
    if "record #" in message or "no valid record" in message or "malformed" in message:
        return "icons-dagster validate --pool ... --benchmarks ... lists every problem of the data, by file, record and id"
    where = f"run {run_id} in the UI (icons-dagster --home {home} ui)" if run_id else "the run's log in the UI"
    return f"the full trace is in {where}; or rerun with --verbose"


def _run(home: Path, config: IconsConfig, methods: tuple[str, ...] = ("icons",), verbose: bool = False) -> int:
    from tqdm import tqdm

    from icons_dagster.runner import prepare_instance_home, run_graph
    from icons_dagster.steps import INVOCATION_TAG, new_invocation_id

    prepare_instance_home(home)
    invocation = new_invocation_id()
    print(f"runs of this command: tag {INVOCATION_TAG}={invocation} (filter the UI's Runs page by it)", file=sys.stderr)
    bar, on_step = _progress_printer()
    try:
        summary = run_graph(
            home, config, on_step=on_step, methods=methods, on_wait=lambda message: tqdm.write(message, file=sys.stderr),
            log_level="INFO" if verbose else "CRITICAL", invocation=invocation,
        )  # fmt: skip
        bar.n = bar.total
        bar.set_description("done")
        bar.close()
    except Exception:
        bar.close()
        raise
    if "subset_json" in summary:
        print(f"ICONS subset (LLaVA JSON): {summary['subset_json']}")
        print(f"per-sample influence, votes and rank (Parquet): {summary['subset_parquet']}")
        print(f"benchmarks: {', '.join(summary['benchmarks'])}")
    if "evaluation_table" in summary:
        print(Path(summary["evaluation_table"]).read_text(encoding="utf-8"))
        print(f"evaluation table (Markdown): {summary['evaluation_table']}")
    if "ofa_subset_json" in summary:
        print(f"OFA subset (LLaVA JSON): {summary['ofa_subset_json']}")
        print(f"per-sample selector confidence and rank (Parquet): {summary['ofa_subset_parquet']}")
        print(f"trained OFA selector, reusable on other pools (--ofa-selector): {summary['ofa_selector']}")
    print(f"Dagster instance: {summary['dagster_home']}  (open the UI with: icons-dagster ui --home {home})")
    print(f"this command's runs: tag {INVOCATION_TAG}={invocation}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the demo never touches the network
    home = resolve_home(args.home)
    return _holding_home(
        "demo", home, lambda: _run(home, _bootstrap_demo(home, args.size, args.shards, args.world_seed), _methods(args.method), args.verbose), args.verbose
    )


def cmd_evaluate(args: argparse.Namespace) -> int:
    """Both selectors on the home's configuration (cached when done), then fine-tune and score each method."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    home = resolve_home(args.home)

    def body() -> int:
        config = read_home_config(home) if ArtifactStore(home).config_file.is_file() else _bootstrap_demo(home, args.size, world_seed=args.world_seed)
        return _run(home, config.replace(**section_overrides(args)), ("icons", "ofa", "evaluation"), args.verbose)

    return _holding_home("evaluate", home, body, args.verbose)


def cmd_run(args: argparse.Namespace) -> int:
    home = resolve_home(args.home)
    config = read_home_config(home).replace(**section_overrides(args))
    if not config.data.pool:
        print("--pool is required (or data.pool in the home's icons.json)", file=sys.stderr)
        return 2
    if not config.model.name_or_path and args.method != "ofa":
        print("--model is required for ICONS: a hub id or checkpoint folder (or model.name_or_path in the home's icons.json)", file=sys.stderr)
        return 2
    if not config.data.benchmarks:
        if args.method != "ofa":
            print("--benchmarks is required for ICONS (--method icons or both)", file=sys.stderr)
            return 2
        benchmarks = ArtifactStore(home).watched_benchmarks_dir  # OFA needs none: a folder the sensor can watch later
        benchmarks.mkdir(parents=True, exist_ok=True)
        config = config.replace(data={"benchmarks": str(benchmarks)})
    return _holding_home("run", home, lambda: _run(home, config, _methods(args.method), args.verbose), args.verbose)


def cmd_validate(args: argparse.Namespace) -> int:
    """Check a pool, a benchmark folder or a folder of benchmarks as the run would read them,
    every image decoded (in parallel) against the pixel limit, without computing anything."""
    from tqdm import tqdm

    from icons_dagster.core.data.records import RecordFileError, benchmark_image_root, find_benchmarks, load_records, screen_images, split_file
    from icons_dagster.core.selection.consensus import subset_size

    home = ArtifactStore(resolve_home(args.home))
    config = read_home_config(home.root) if home.config_file.is_file() else IconsConfig()
    max_pixels = args.max_image_pixels or config.data.max_image_pixels
    p = args.p if args.p is not None else config.selection.p
    image_root = Path(args.image_root).resolve() if args.image_root else None
    targets: list[tuple[str, Path, Path | None]] = []
    if args.pool:
        targets.append(("pool", Path(args.pool), image_root))
    if args.benchmark:
        folder = Path(args.benchmark)
        for split in ("val", "test"):
            if (path := split_file(folder, split)) is not None:
                targets.append((f"{folder.name}/{split}", path, benchmark_image_root(folder, image_root)))
        if not any(t[0].startswith(folder.name + "/val") for t in targets):
            print(f"{folder}: no val.json or val.jsonl", file=sys.stderr)
            return 2
    if args.benchmarks:
        for name, _ in find_benchmarks(args.benchmarks).items():
            folder = Path(args.benchmarks) / name
            for split in ("val", "test"):
                if (path := split_file(folder, split)) is not None:
                    targets.append((f"{name}/{split}", path, benchmark_image_root(folder, image_root)))
    if not targets:
        print("nothing to validate: give --pool, --benchmark or --benchmarks", file=sys.stderr)
        return 2
    print(f"images: every one decoded, at most {max_pixels:,} pixels each (data.max_image_pixels), {args.workers} worker(s)")
    problems_total = 0
    for label, path, root in targets:
        try:
            loaded = load_records(path, root)
        except (RecordFileError, FileNotFoundError) as error:
            print(f"[{label}] ERROR {error}")
            problems_total += 1
            continue
        bar = tqdm(total=1, desc=f"[{label}] images", unit="image", file=sys.stderr, disable=None, leave=False)

        def progress(done: int, total: int) -> None:
            bar.total, bar.n = total, done
            bar.refresh()

        loaded = screen_images(loaded, max_pixels, decode=True, workers=args.workers, progress=progress)
        bar.close()
        print(f"[{label}] {path}: {len(loaded.records)} valid, {len(loaded.problems)} invalid")
        for problem in loaded.problems:
            print(f"  {problem}")
        problems_total += len(loaded.problems)
        if label == "pool" and loaded.records:
            try:
                print(f"[pool] p = {p} selects {subset_size(len(loaded.records), p)} of its {len(loaded.records)} valid records")
            except ValueError as error:
                print(f"[pool] ERROR selection.p: {error}: raise --p")
                problems_total += 1
    print(f"{problems_total} problem(s) found")
    return 1 if problems_total else 0


def cmd_align(args: argparse.Namespace) -> int:
    """Stage-1 alignment of a base checkpoint on a caption file (the paper's starting regime)."""
    from icons_dagster.core.model.alignment import AlignmentInputError, align

    bar = None
    try:
        recipe = AlignmentRecipe(
            steps=args.steps, batch_size=args.batch_size, learning_rate=args.learning_rate, seed=args.seed, train=args.train,
            heldout_fraction=args.heldout_fraction, num_threads=args.threads, max_length=args.max_length, device=args.device,
            loss_mean=args.loss_mean,
        )
        bar, progress = _loss_bar("stage-1 alignment")
        result = align(
            args.captions, args.image_root, args.model, args.out, recipe,
            heldout_captions=args.heldout_captions, heldout_image_root=args.heldout_image_root, texts=args.texts, force=args.force,
            progress=progress, revision=args.revision, trust_remote_code=args.trust_remote_code,
        )
    except AlignmentInputError as error:
        print(f"align: {error}", file=sys.stderr)
        return 2
    finally:
        if bar is not None:
            bar.close()
    report = result.report
    caps, recipe_info = report["captions"], report["recipe"]
    if result.reused:
        print(f"reused: {result.out} already holds this alignment (same inputs and recipe)")
    print(f"captions: {caps['n_usable']} usable of {caps['n_entries']} in {caps['path']}; {caps['n_problems']} skipped")
    for problem in caps["problems"][:5]:
        print(f"  {problem}")
    if report.get("texts"):
        print(f"texts: {report['texts']['n_usable']} text-only records from {report['texts']['path']}, trained alongside")
    frozen = ", ".join(report["frozen"]) or "nothing"
    print(f"trained {' + '.join(report['trained'])} (frozen: {frozen}) on {report['n_encoded']} records: "
          f"{recipe_info['steps']} steps of {recipe_info['batch_size']}, lr {recipe_info['learning_rate']:g}")
    print(f"training loss: {report['first_loss']:.3f} (first step) -> {report['final_window_loss']:.3f} (last {min(10, recipe_info['steps'])} steps)")
    held = report["heldout"]
    if held:
        mismatched = held["loss_after_mismatched_images"]
        print(f"held-out caption loss per answer token ({held['n_encoded']} records): before {held['loss_before']:.3f}, "
              f"after {held['loss_after']:.3f}, after with mismatched images " + (f"{mismatched:.3f}" if mismatched is not None else "n/a (one image, or text-only records)"))
    print(f"aligned checkpoint: {result.out}  (report: {result.out / 'alignment.json'}, {report['seconds']:.0f} s)")
    return 0


def cmd_register(args: argparse.Namespace) -> int:
    home = resolve_home(args.home)
    from icons_dagster.runner import prepare_instance_home

    prepare_instance_home(home)
    from dagster import DagsterInstance

    from icons_dagster.registration import register_benchmarks

    names, added = register_benchmarks(DagsterInstance.get(), read_home_config(home).data.benchmarks_path())
    print(f"benchmarks: {', '.join(names)}; newly registered: {', '.join(added) or 'none'}")
    return 0


def cmd_explain(args: argparse.Namespace) -> int:
    """Print why a sample is in (or out of) the home's current subset."""
    from icons_dagster.core.stages.explain import explain_sample, explanation_markdown
    from icons_dagster.resources.home import STORE_URL_ENV

    home = resolve_home(args.home)
    store = ArtifactStore(home, read_home_config(home).store.remote or os.environ.get(STORE_URL_ENV) or None)
    try:
        explanation = explain_sample(store, store.read_ref("selected_subset"), store.read_ref("vote_table"), args.sample_id)
    except (KeyError, FileNotFoundError) as error:
        print(str(error).strip("'\""), file=sys.stderr)
        return 2
    print(explanation_markdown(explanation))
    return 0


def cmd_ui(args: argparse.Namespace) -> int:
    home = resolve_home(args.home)
    from icons_dagster.jobs import CODE_LOCATION
    from icons_dagster.runner import prepare_instance_home

    prepare_instance_home(home)
    command = [sys.executable, "-m", "dagster", "dev", "-m", CODE_LOCATION, "-h", args.host, "-p", str(args.port)]
    print(f"DAGSTER_HOME={os.environ['DAGSTER_HOME']} {' '.join(command)}")
    return subprocess.call(command, env=os.environ.copy())


def _add_world_flags(parser: argparse.ArgumentParser, size_help: str) -> None:
    """--size and --world-seed: which generated world a demo home is built on."""
    parser.add_argument("--size", choices=demo_sizes(), default="default", help=size_help)
    parser.add_argument("--world-seed", type=int, default=0, help="seed of the generated world and (mix) its base model; 0 is the one results are reported on (default 0)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="icons-dagster", description=__doc__.splitlines()[0])
    parser.add_argument("--home", help="store root holding artifacts, exports and the Dagster instance (env ICONS_HOME, default ./.icons_home)")
    parser.add_argument("--verbose", action="store_true", help="show Dagster's log and full tracebacks (default: the one-line cause and a hint)")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="run the whole graph on the embedded demo pool and tiny model")
    _add_world_flags(demo, "which world (mix: the LLaVA-665K-shaped one, docs/preregistration-mix.md)")
    demo.add_argument("--shards", type=int, help="number of training-gradient shards (default 4)")
    demo.add_argument("--method", choices=["icons", "ofa", "both"], default="both", help="which selector(s) to run (default both)")
    demo.set_defaults(func=cmd_demo)

    run = sub.add_parser("run", help="run the whole graph on your pool, benchmarks and model (settings saved in the home's icons.json)")
    run.add_argument("--method", choices=["icons", "ofa", "both"], default="icons", help="which selector(s) to run (default icons)")
    add_section_flags(run, RUN_SECTIONS)
    run.set_defaults(func=cmd_run)

    evaluate = sub.add_parser("evaluate", help="fine-tune on every method's subset and score each benchmark's test split")
    _add_world_flags(evaluate, "world when the home has no config yet (large: 2,640 records; mix: the LLaVA-665K-shaped world)")
    add_section_flags(evaluate, EVALUATE_SECTIONS)
    evaluate.set_defaults(func=cmd_evaluate)

    validate = sub.add_parser("validate", help="check a pool or benchmarks without computing anything")
    validate.add_argument("--pool")
    validate.add_argument("--benchmark", help="one benchmark folder")
    validate.add_argument("--benchmarks", help="a folder of benchmark folders")
    validate.add_argument("--image-root")
    validate.add_argument("--max-image-pixels", type=int, help="largest image allowed (default: data.max_image_pixels of the home, else 40,000,000)")
    validate.add_argument("--p", type=float, help="the selection ratio to check against what survives (default: selection.p of the home)")
    validate.add_argument("--workers", type=int, default=max(1, os.cpu_count() or 1), help="processes decoding images (default: every core)")
    validate.set_defaults(func=cmd_validate)

    defaults = AlignmentRecipe()
    align_cmd = sub.add_parser(
        "align",
        help="stage-1 alignment of a base checkpoint on a LLaVA-format caption file (vision tower frozen); writes an aligned checkpoint",
        description="Stage-1 (feature-alignment) training as LLaVA's, on CPU: the vision tower frozen, the projector (and the "
        "language model) trained on captions; reports held-out caption loss before, after, and after with mismatched images.",
    )
    align_cmd.add_argument("--captions", required=True, help="LLaVA-format caption file (.json or .jsonl); bad records are skipped and listed")
    align_cmd.add_argument("--image-root", required=True, help="folder the captions' image paths are relative to")
    align_cmd.add_argument("--model", required=True, help="base checkpoint: a local folder or a hub id")
    align_cmd.add_argument("--out", required=True, help="folder for the aligned checkpoint and alignment.json")
    align_cmd.add_argument("--steps", type=int, default=defaults.steps, help=f"optimizer steps (default {defaults.steps})")
    align_cmd.add_argument("--batch-size", type=int, default=defaults.batch_size, help=f"records per step (default {defaults.batch_size})")
    align_cmd.add_argument("--learning-rate", type=float, default=defaults.learning_rate,
                           help=f"peak AdamW learning rate, 3%% linear warm-up then cosine (default {defaults.learning_rate:g}; LLaVA's projector-only stage 1 uses 1e-3)")
    align_cmd.add_argument("--seed", type=int, default=defaults.seed, help="seed of the visiting order and the held-out split (default 0)")
    align_cmd.add_argument("--train", choices=TRAIN_CHOICES, default=defaults.train,
                           help="what trains: projector+lm (a random or small LM, the demo's), projector (LLaVA's, for a pretrained LM) or lm "
                           "(the language model alone; text-only records train too: a first stage for a random LM); default projector+lm")
    align_cmd.add_argument("--heldout-fraction", type=float, default=defaults.heldout_fraction,
                           help=f"share of the captions' images held out for the loss check, at most 1000 images; 0: none (default {defaults.heldout_fraction})")
    align_cmd.add_argument("--texts", help="text-only records (LLaVA format) trained alongside the captions, so the language model keeps a text skill; needs the LM to train")
    align_cmd.add_argument("--loss-mean", choices=LOSS_MEANS, default=defaults.loss_mean,
                           help="token: the token mean over a batch, as LLaVA's (default); record: every record weighs the same, so short answers count in a mixed batch")
    align_cmd.add_argument("--heldout-captions", help="a separate held-out caption file instead of --heldout-fraction")
    align_cmd.add_argument("--heldout-image-root", help="image root of --heldout-captions (default: --image-root)")
    align_cmd.add_argument("--threads", type=int, default=defaults.num_threads, help="torch threads; the weights are byte-identical for equal inputs, seed and threads (default 1)")
    align_cmd.add_argument("--device", choices=DEVICE_CHOICES, default=defaults.device,
                           help="cpu (byte-identical for equal inputs, seed and threads) or cuda (bf16 autocast; a real checkpoint's stage 1); default cpu")
    align_cmd.add_argument("--max-length", type=int, default=defaults.max_length, help=f"tokens per record, longer ones truncated and counted (default {defaults.max_length})")
    align_cmd.add_argument("--revision", help="hub revision of --model")
    align_cmd.add_argument("--trust-remote-code", action="store_true", help="allow the checkpoint's own Python code (off unless asked)")
    align_cmd.add_argument("--force", action="store_true", help="replace an earlier alignment of other inputs or another recipe in --out")
    align_cmd.set_defaults(func=cmd_align)

    register = sub.add_parser("register-benchmarks", help="register the benchmarks folder's sub-folders as partitions")
    register.set_defaults(func=cmd_register)

    explain = sub.add_parser("explain", help="why is this sample in the subset? per-benchmark influence, votes, rank")
    explain.add_argument("sample_id")
    explain.set_defaults(func=cmd_explain)

    ui = sub.add_parser("ui", help="open the Dagster UI on the home's instance (binds 127.0.0.1)")
    ui.add_argument("--host", default="127.0.0.1")
    ui.add_argument("--port", type=int, default=3000)
    ui.set_defaults(func=cmd_ui)
    return parser


def main(argv: list[str] | None = None) -> int:
    import warnings

    # Library notices (beta parameters, deprecations) are not for the CLI's user.
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*is currently in beta.*")
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
