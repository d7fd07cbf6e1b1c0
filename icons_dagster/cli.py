"""``icons-dagster``: run the asset graph, validate data, open the UI.

The CLI writes the home's ``icons.json`` and launches the same assets through Dagster on
the home's persistent instance; it never computes anything on a second code path.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from icons_dagster.demo.data import DEMO_SIZES
from icons_dagster.resources.home import DEMO_PRESET, read_home_config, resolve_home, write_home_config


def _progress_printer():
    from tqdm import tqdm

    bar = tqdm(total=1, unit="step", file=sys.stderr, dynamic_ncols=True)

    def on_step(index: int, total: int, step) -> None:
        bar.total = total
        bar.n = index
        bar.set_description(step.label[:60])
        bar.refresh()

    return bar, on_step


def demo_preset(size: str) -> dict[str, Any]:
    """The demo configuration; the test-size demo gets a shorter stage 1 (200 steps, ~12 s)."""
    config = json.loads(json.dumps(DEMO_PRESET))
    config["data"]["demo_size"] = size
    if size == "test":
        config["model"]["demo_stage1_steps"] = 200
    return config


def _methods(choice: str) -> tuple[str, ...]:
    return ("icons", "ofa") if choice == "both" else (choice,)


def _run(home: Path, config: dict[str, Any], methods: tuple[str, ...] = ("icons",)) -> int:
    from icons_dagster.runner import prepare_instance_home

    os.environ["ICONS_NUM_SHARDS"] = str(config.get("num_shards", 4))
    write_home_config(home, config)
    prepare_instance_home(home)
    from icons_dagster.runner import run_graph

    bar, on_step = _progress_printer()
    try:
        summary = run_graph(home, config, on_step=on_step, methods=methods)
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
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the demo never touches the network
    home = resolve_home(args.home)
    config = demo_preset(args.size)
    if args.shards:
        config["num_shards"] = args.shards
    return _run(home, config, _methods(args.method))


def cmd_evaluate(args: argparse.Namespace) -> int:
    """Both selectors on the home's configuration (cached when done), then fine-tune and score each method."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    home = resolve_home(args.home)
    if (home / "icons.json").exists():
        config = read_home_config(home)
    else:
        config = demo_preset(args.size)
    evaluation = config.setdefault("evaluation", {})
    for key in ("learning_rate", "epochs", "batch_size", "seed"):
        value = getattr(args, key)
        if value is not None:
            evaluation[key] = value
    if args.equal_steps is not None:
        evaluation["equal_steps"] = args.equal_steps
    if args.methods is not None:
        evaluation["methods"] = [m for m in args.methods.split(",") if m] if args.methods != "all" else []
    return _run(home, config, ("icons", "ofa", "evaluation"))


def cmd_run(args: argparse.Namespace) -> int:
    home = resolve_home(args.home)
    config = read_home_config(home) if (home / "icons.json").exists() else {"data": {}, "model": {}, "settings": {}}
    if args.benchmarks:
        benchmarks = Path(args.benchmarks).resolve()
    elif args.method == "ofa":  # OFA needs no benchmark: an empty folder the sensor can watch later
        benchmarks = home / "benchmarks"
        benchmarks.mkdir(parents=True, exist_ok=True)
    else:
        print("--benchmarks is required for ICONS (--method icons or both)", file=sys.stderr)
        return 2
    config.setdefault("data", {}).update({"pool": str(Path(args.pool).resolve()), "benchmarks": str(benchmarks)})
    if args.image_root:
        config["data"]["image_root"] = str(Path(args.image_root).resolve())
    model = config.setdefault("model", {})
    if args.model:
        model["name_or_path"] = args.model
    for key in ("revision", "dtype", "device", "max_length", "autocast", "lora_r", "lora_alpha", "lora_dropout"):
        value = getattr(args, key)
        if value is not None:
            model[key] = value
    if args.trust_remote_code:
        model["trust_remote_code"] = True
    if args.gradient_checkpointing is not None:
        model["gradient_checkpointing"] = args.gradient_checkpointing
    if args.deterministic is not None:
        model["deterministic"] = args.deterministic
    settings = config.setdefault("settings", {})
    for key in ("p", "aggregation", "tiebreak", "coverage", "warmup_ratio", "projection_dim", "projection_seed", "projector", "train_gradient", "gradient_batch_size", "gradient_length_grouping", "epochs", "num_checkpoints", "learning_rate"):
        value = getattr(args, key)
        if value is not None:
            settings[key] = value
    ofa = config.setdefault("ofa", {})
    for flag, key in (
        ("ofa_embedder", "embedder"),
        ("ofa_embedder_model", "embedder_model"),
        ("ofa_clusters", "num_clusters"),
        ("ofa_confidence", "confidence"),
        ("ofa_p", "p"),
    ):
        value = getattr(args, flag)
        if value is not None:
            ofa[key] = value
    if args.ofa_selector is not None:
        ofa["selector"] = str(Path(args.ofa_selector).resolve()) if args.ofa_selector else ""
    if args.shards:
        config["num_shards"] = args.shards
    config.setdefault("num_shards", 4)
    return _run(home, config, _methods(args.method))


def cmd_validate(args: argparse.Namespace) -> int:
    """Check a pool, a benchmark folder or a folder of benchmarks without computing anything."""
    from icons_dagster.core.records import RecordFileError, benchmark_image_root, find_benchmarks, load_records, split_file

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
    problems_total = 0
    for label, path, root in targets:
        try:
            loaded = load_records(path, root)
        except (RecordFileError, FileNotFoundError) as error:
            print(f"[{label}] ERROR {error}")
            problems_total += 1
            continue
        print(f"[{label}] {path}: {len(loaded.records)} valid, {len(loaded.problems)} invalid")
        for problem in loaded.problems:
            print(f"  {problem}")
        problems_total += len(loaded.problems)
    print(f"{problems_total} problem(s) found")
    return 1 if problems_total else 0


def cmd_register(args: argparse.Namespace) -> int:
    home = resolve_home(args.home)
    from icons_dagster.runner import prepare_instance_home

    prepare_instance_home(home)
    from dagster import DagsterInstance

    from icons_dagster.registration import register_benchmarks
    from icons_dagster.resources import DataResource, StoreResource

    config = read_home_config(home)
    paths = DataResource(**config.get("data", {})).paths(StoreResource(root=str(home)).store())
    names, added = register_benchmarks(DagsterInstance.get(), paths.benchmarks)
    print(f"benchmarks: {', '.join(names)}; newly registered: {', '.join(added) or 'none'}")
    return 0


def cmd_explain(args: argparse.Namespace) -> int:
    """Print why a sample is in (or out of) the home's current subset."""
    from icons_dagster.core.pipeline import explain_sample, explanation_markdown
    from icons_dagster.core.store import ArtifactStore
    from icons_dagster.resources.refs import read_ref

    home = resolve_home(args.home)
    try:
        explanation = explain_sample(ArtifactStore(home), read_ref(home, "selected_subset"), read_ref(home, "vote_table"), args.sample_id)
    except (KeyError, FileNotFoundError) as error:
        print(str(error).strip("'\""), file=sys.stderr)
        return 2
    print(explanation_markdown(explanation))
    return 0


def cmd_ui(args: argparse.Namespace) -> int:
    home = resolve_home(args.home)
    from icons_dagster.runner import prepare_instance_home

    prepare_instance_home(home)
    command = [sys.executable, "-m", "dagster", "dev", "-m", "icons_dagster.definitions", "-h", args.host, "-p", str(args.port)]
    print(f"DAGSTER_HOME={os.environ['DAGSTER_HOME']} {' '.join(command)}")
    return subprocess.call(command, env=os.environ.copy())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="icons-dagster", description=__doc__.splitlines()[0])
    parser.add_argument("--home", help="store root holding artifacts, exports and the Dagster instance (env ICONS_HOME, default ./.icons_home)")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="run the whole graph on the embedded demo pool and tiny model")
    demo.add_argument("--size", choices=sorted(DEMO_SIZES), default="default")
    demo.add_argument("--shards", type=int, help="number of training-gradient shards (default 4)")
    demo.add_argument("--method", choices=["icons", "ofa", "both"], default="both", help="which selector(s) to run (default both)")
    demo.set_defaults(func=cmd_demo)

    run = sub.add_parser("run", help="run the whole graph on your pool, benchmarks and model")
    run.add_argument("--pool", required=True, help="LLaVA-format JSON/JSONL pool")
    run.add_argument("--benchmarks", help="folder with one sub-folder per benchmark (val.json required); ICONS needs it")
    run.add_argument("--image-root", help="folder the pool's image paths are relative to")
    run.add_argument("--model", help="hub id or local folder: an image-text-to-text checkpoint (LLaVA, Qwen2.5-VL, Idefics3/SmolVLM) or a text-only causal LM")
    run.add_argument("--revision")
    run.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"])
    run.add_argument("--device")
    run.add_argument("--max-length", type=int, help="tokens per sequence (default 2048, as LLaVA); longer ones are truncated and counted")
    run.add_argument("--autocast", choices=["auto", "off", "bfloat16", "float16"], help="mixed precision of forward passes (auto: bf16 on CUDA)")
    run.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, help="recompute activations in backward (less GPU memory)")
    run.add_argument("--deterministic", action=argparse.BooleanOptionalAction, help="CUDA: deterministic kernels, byte-identical reruns (default on)")
    run.add_argument("--lora-r", type=int)
    run.add_argument("--lora-alpha", type=int)
    run.add_argument("--lora-dropout", type=float)
    run.add_argument("--trust-remote-code", action="store_true", help="allow the checkpoint's own Python code (off by default)")
    run.add_argument("--p", type=float, help="selection ratio (default 0.2)")
    run.add_argument("--aggregation", choices=["vote", "mean", "max", "rank", "norm"], help="how benchmarks' influences combine (default vote)")
    run.add_argument("--tiebreak", choices=["mean-rank", "max-rank"], help="order of records with equal aggregates (default mean-rank)")
    run.add_argument("--coverage", type=float, help="share of the subset reserved for each benchmark's own top records (default 0.5; 0 = the paper's vote)")
    run.add_argument("--warmup-ratio", type=float)
    run.add_argument("--epochs", type=int)
    run.add_argument("--num-checkpoints", type=int)
    run.add_argument("--learning-rate", type=float)
    run.add_argument("--projector", choices=["countsketch", "rademacher"])
    run.add_argument("--projection-dim", type=int)
    run.add_argument("--projection-seed", type=int)
    run.add_argument("--train-gradient", choices=["sgd", "adam"])
    run.add_argument("--gradient-batch-size", type=int)
    run.add_argument("--gradient-length-grouping", type=int, help="sort windows of this many batches by length before batching (default 16; 1 keeps input order)")
    run.add_argument("--shards", type=int)
    run.add_argument("--method", choices=["icons", "ofa", "both"], default="icons", help="which selector(s) to run (default icons)")
    run.add_argument("--ofa-embedder", choices=["minilm-pixels", "clip"], help="OFA's frozen image-text space (use clip for real images)")
    run.add_argument("--ofa-embedder-model", help="CLIP hub id or local folder, e.g. openai/clip-vit-large-patch14")
    run.add_argument("--ofa-clusters", type=int, help="k of the k-means pseudo labels (default 64)")
    run.add_argument("--ofa-confidence", choices=["max_softmax", "margin", "entropy"])
    run.add_argument("--ofa-p", type=float, help="OFA selection ratio (default 0.2)")
    run.add_argument("--ofa-selector", help="reuse a trained selector folder (e.g. another home's exports/ofa_selector); '' trains again")
    run.set_defaults(func=cmd_run)

    evaluate = sub.add_parser("evaluate", help="fine-tune on every method's subset and score each benchmark's test split")
    evaluate.add_argument("--size", choices=sorted(DEMO_SIZES), default="default", help="demo size when the home has no config yet (large: 2,640 records)")
    evaluate.add_argument("--learning-rate", type=float)
    evaluate.add_argument("--epochs", type=int)
    evaluate.add_argument("--batch-size", type=int)
    evaluate.add_argument("--seed", type=int)
    evaluate.add_argument("--methods", help="comma-separated methods to compare (default all: full, random-0/1/2, icons, ...); 'all' resets")
    evaluate.add_argument("--equal-steps", action=argparse.BooleanOptionalAction, default=None, help="train every subset about as many steps as the full data")
    evaluate.set_defaults(func=cmd_evaluate)

    validate = sub.add_parser("validate", help="check a pool or benchmarks without computing anything")
    validate.add_argument("--pool")
    validate.add_argument("--benchmark", help="one benchmark folder")
    validate.add_argument("--benchmarks", help="a folder of benchmark folders")
    validate.add_argument("--image-root")
    validate.set_defaults(func=cmd_validate)

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
