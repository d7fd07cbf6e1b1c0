"""Influence + vote + selection at LLaVA-665K scale, streamed from stored float16 shards.

Target (issue): 665,000 x 5,120 float16 features, 10 benchmarks, influence for all of
them + vote + Table-6 aggregations + selection in <= 10 s wall on 2 cores with peak RSS
<= 2 GB.

What it does:
1. Generates synthetic unit-norm float16 features once into --dir (16 shards of
   ~41.5K rows, ``features-checkpoint-0.npy`` + ``samples.parquet`` each, as the
   pipeline stores them) and 10 benchmarks' mean validation features (benchmark 0
   has 3 subtask groups), all seeded. Rows have a shared low-rank structure, so
   benchmarks' influence columns correlate as real ones do.
2. Runs each measurement in a fresh subprocess (generation memory never counts):
   - stream, cold page cache (the shards are evicted with posix_fadvise first);
   - stream, warm page cache (twice; the table shows the faster run);
   - baseline "naive": each shard np.load-ed whole, cast to float32, one matmul;
   - baseline "per-benchmark memmap": the pipeline's previous call pattern,
     ``influence_scores(np.load(path, mmap_mode="r"), means_k)`` per shard and
     benchmark (this version's ``influence_scores``);
   - baseline "one pass per benchmark": ``influence_scores_from_files`` once per
     benchmark, what the graph did while each task_influence run scored one benchmark
     (now a run scores every benchmark it holds in one pass).
   Per stage: wall time, CPU time (all threads) and peak RSS (VmHWM, reset between
   stages through /proc/self/clear_refs); per run: the process's ru_maxrss.
3. Checks the streamed scores are bit-identical to the per-benchmark
   ``influence_scores`` and close to the naive float32 matmul.
4. Reports tie sensitivity of the selection and storage per sample.

The machine is shared in this project: the load average at the start of each run is
printed next to it, and CPU times are less sensitive to contention than wall times.

The stream is also run with every file opened through fsspec (``file://`` URLs: the reads
an object store such as ``s3://`` gets, without a local copy), against the local paths.

Checking the files against their manifests (``--verify``), cold cache each: the pipeline's
earlier pattern (sha256 of every file, a separate read, then the stream) against the stream
hashing the bytes it reads (``digests``), and the hashes of the two compared.

A scaling series is one run per size, each writing its numbers with ``--json``:
``for n in 665000 1330000 2660000; do python bench/consensus_scale.py --rows $n --skip-baselines --json scale-$n.json; done``.

Usage: python bench/consensus_scale.py [--rows 665000] [--dim 5120] [--dir /tmp/icons-consensus-scale] [--keep]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

DEFAULT_DIR = "/tmp/icons-consensus-scale"
FEATURES = "features-checkpoint-0.npy"
SAMPLES = "samples.parquet"
INFLUENCE_STAGE = "1. influence, all benchmarks, one streaming pass"


# -- synthetic data --------------------------------------------------------------------


def _npy_header(shape: tuple[int, int], descr: str = "<f2") -> bytes:
    import io

    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": descr, "fortran_order": False, "shape": shape})
    return buf.getvalue()


def generate(root: Path, n: int, d: int, shards: int, n_bench: int, seed: int = 0, rank: int = 32) -> dict:
    """Write the shards, samples tables, benchmark means; return the spec (also spec.json)."""
    import polars as pl
    import torch

    from icons_dagster.core.selection.influence import mean_validation_feature, stack_group_means

    t0 = time.perf_counter()
    root.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    basis = torch.randn(rank, d, generator=g) / d**0.5  # latent directions, ~orthonormal
    signal, noise = 0.6, 1.0 / d**0.5
    # benchmark directions in latent space: a shared component + a specific one
    common = torch.randn(rank, generator=g)
    common /= common.norm()

    def direction() -> torch.Tensor:
        v = torch.randn(rank, generator=g)
        v = 0.6 * common + 0.8 * v / v.norm()
        return v / v.norm()

    per_benchmark, names = [], []
    for k in range(n_bench):
        subtasks = ["a", "b", "c"] if k == 0 else [None]
        rows, labels = [], []
        for s in subtasks:
            z = 1.5 * direction() + torch.randn(300, rank, generator=g)
            v = z @ basis * signal + torch.randn(300, d, generator=g) * noise
            rows.append((v / v.norm(dim=1, keepdim=True)).half().numpy())
            labels += [s] * 300
        val = np.concatenate(rows)
        means, _ = mean_validation_feature(val, labels if subtasks[0] is not None else None)
        per_benchmark.append(means)
        names.append(f"bench{k}" + ("(3 subtasks)" if k == 0 else ""))
    means, groups = stack_group_means(per_benchmark)
    np.save(root / "means.npy", means, allow_pickle=False)

    bounds = np.linspace(0, n, shards + 1).astype(int)
    block = 8192
    z = torch.empty(block, rank)
    x = torch.empty(block, d)
    half = torch.empty(block, d, dtype=torch.float16)
    norms = torch.empty(block, 1)
    paths = []
    for s in range(shards):
        a, b = int(bounds[s]), int(bounds[s + 1])
        folder = root / f"shard-{s:02d}"
        folder.mkdir(exist_ok=True)
        gs = torch.Generator().manual_seed(seed * 1_000_003 + s + 1)
        path = folder / FEATURES
        with open(path, "wb") as f:
            f.write(_npy_header((b - a, d)))
            for i in range(a, b, block):
                r = min(b, i + block) - i
                torch.randn(r, rank, generator=gs, out=z[:r])
                torch.randn(r, d, generator=gs, out=x[:r])
                x[:r].addmm_(z[:r], basis, beta=noise, alpha=signal)
                torch.linalg.vector_norm(x[:r], dim=1, keepdim=True, out=norms[:r])
                x[:r].div_(norms[:r])
                half[:r].copy_(x[:r])
                f.write(memoryview(half[:r].numpy()).cast("B"))
            f.flush()
            os.fsync(f.fileno())
        rng = np.random.default_rng(seed + s)
        pl.DataFrame(
            {
                "id": [f"s{i:07d}" for i in range(a, b)],
                "n_tokens": rng.integers(40, 2048, b - a).astype(np.int32),
                "n_answer_tokens": rng.integers(1, 512, b - a).astype(np.int32),
                "subtask": [None] * (b - a),
                "grad_norm_0": rng.lognormal(0.0, 0.5, b - a).astype(np.float32),
                "loss_0": rng.gamma(2.0, 0.6, b - a).astype(np.float32),
            },
            schema_overrides={"subtask": pl.String},
        ).write_parquet(folder / SAMPLES)
        paths.append(str(path))
    spec = {
        "rows": n,
        "dim": d,
        "shards": paths,
        "groups": [list(gr) for gr in groups],
        "benchmarks": names,
        "seed": seed,
        "generation_s": time.perf_counter() - t0,
    }
    (root / "spec.json").write_text(json.dumps(spec, indent=2))
    return spec


def evict(paths: list[str]) -> None:
    """Drop the files' pages from the page cache (clean pages only; no root needed)."""
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def cached_gib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("Cached:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def warm(paths: list[str]) -> None:
    buf = bytearray(8 << 20)
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass


# -- measurement (runs in a child process) ---------------------------------------------


class Meter:
    """Wall, CPU (all threads) and peak RSS of consecutive stages of this process."""

    def __init__(self) -> None:
        self.stages: dict[str, dict] = {}
        self._can_reset = True

    def _reset_peak(self) -> None:
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            self._can_reset = False

    @staticmethod
    def _status_kib(key: str) -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
        return -1

    def process_peak_mib(self) -> float:
        """Peak RSS of the process so far: the stage peaks (resetting VmHWM hides earlier
        peaks from ru_maxrss) and ru_maxrss (which covers the imports before stage 1)."""
        maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        return max([maxrss] + [s["peak_rss_mib"] for s in self.stages.values()])

    def run(self, name: str, fn):
        self._reset_peak()
        r0 = resource.getrusage(resource.RUSAGE_SELF)
        t0 = time.perf_counter()
        out = fn()
        wall = time.perf_counter() - t0
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        peak = self._status_kib("VmHWM") if self._can_reset else r1.ru_maxrss
        self.stages[name] = {
            "wall_s": wall,
            "cpu_s": (r1.ru_utime + r1.ru_stime) - (r0.ru_utime + r0.ru_stime),
            "peak_rss_mib": peak / 1024,
        }
        return out


def child(cfg: dict) -> dict:
    import polars as pl
    import torch

    torch.set_num_threads(cfg["threads"])
    from icons_dagster.core.selection import consensus
    from icons_dagster.core.selection.influence import influence_scores, influence_scores_from_files

    spec = cfg["spec"]
    paths = spec["shards"]
    groups = [tuple(gr) for gr in spec["groups"]]
    means = np.load(Path(cfg["dir"]) / "means.npy")
    p = cfg["p"]
    meter = Meter()
    result: dict = {"load_avg": os.getloadavg()[0], "mode": cfg["mode"]}

    if cfg.get("via_url"):  # the object-storage path: every file opened through fsspec (file:// stands in for s3://)
        import fsspec

        paths = [f"file://{path}" for path in paths]

        def samples_table(path: str):
            with fsspec.open(path.rsplit("/", 1)[0] + "/" + SAMPLES, "rb") as f:
                return pl.read_parquet(f, columns=["id"])
    else:

        def samples_table(path: str):
            return pl.read_parquet(Path(path).parent / SAMPLES, columns=["id"])

    if cfg["mode"] == "stream":
        ids = meter.run("load ids (samples.parquet)", lambda: [i for path in paths for i in samples_table(path)["id"].to_list()])
        scores = meter.run(
            INFLUENCE_STAGE,
            lambda: influence_scores_from_files(paths, means, groups, chunk_rows=cfg["chunk_rows"], workers=cfg["workers"]),
        )

        def vote_stage():
            tau = consensus.vote_thresholds(scores, p)
            v = consensus.votes(scores, tau)
            vote_sum = v.sum(axis=1)
            table6 = {m: consensus.aggregate(scores, m) for m in ("mean", "max", "rank", "norm")}
            return tau, v, vote_sum, table6

        tau, v, vote_sum, table6 = meter.run("2. thresholds + votes + vote sums + Table-6 aggregations", vote_stage)
        sel = meter.run("3. select (vote, documented tie-break)", lambda: consensus.select(ids, scores, p))
        result["maxrss_mib"] = meter.process_peak_mib()
        result["stages"] = meter.stages
        if cfg.get("scores_in"):
            result["bit_identical_to_stream"] = bool(np.array_equal(scores, np.load(cfg["scores_in"])))
        if cfg.get("analyze"):
            np.save(cfg["scores_out"], scores)
            result["analysis"] = analyze(ids, scores, sel, vote_sum, consensus)
            # end-to-end check: per-shard, per-benchmark influence_scores give the same bits
            x = np.load(paths[0], mmap_mode="r")
            ref = np.stack([influence_scores(x, means[a:b]) for a, b in groups], axis=1)
            result["bit_identical_to_influence_scores_shard0"] = bool(np.array_equal(ref, scores[: x.shape[0]]))
        return result

    if cfg["mode"] in ("hash_then_stream", "stream_hashed"):
        stream = lambda **kw: influence_scores_from_files(paths, means, groups, chunk_rows=cfg["chunk_rows"], workers=cfg["workers"], **kw)  # noqa: E731
        if cfg["mode"] == "hash_then_stream":
            from icons_dagster.core.storage.fingerprint import file_sha256

            result["sha256"] = meter.run("sha256 of every file (its own read)", lambda: [file_sha256(path) for path in paths])
            scores = meter.run(INFLUENCE_STAGE, stream)
        else:
            digests: list = []
            scores = meter.run("influence + sha256 of the bytes it read", lambda: stream(digests=digests))
            result["sha256"] = [x.sha256 for x in digests]
        result["bit_identical_to_stream"] = bool(np.array_equal(scores, np.load(cfg["scores_in"])))
        result["stages"] = meter.stages
        result["maxrss_mib"] = meter.process_peak_mib()
        return result

    if cfg["mode"] == "naive":

        def naive():
            parts = []
            for path in paths:
                x = np.load(path).astype(np.float32)  # whole shard in memory
                s = x @ means.T  # one matmul, all groups
                parts.append(np.stack([s[:, a:b].max(axis=1) for a, b in groups], axis=1))
                del x, s
            return np.concatenate(parts)

        scores = meter.run("influence (naive)", naive)
    elif cfg["mode"] == "passes":

        def pass_per_benchmark():
            return np.concatenate(
                [influence_scores_from_files(paths, means[a:b], chunk_rows=cfg["chunk_rows"], workers=cfg["workers"]) for a, b in groups], axis=1
            )

        scores = meter.run("influence (one pass per benchmark)", pass_per_benchmark)
    else:  # per-benchmark memmap

        def per_benchmark():
            parts = []
            for path in paths:
                x = np.load(path, mmap_mode="r")
                parts.append(np.stack([influence_scores(x, means[a:b]) for a, b in groups], axis=1))
                del x
            return np.concatenate(parts)

        scores = meter.run("influence (per-benchmark memmap)", per_benchmark)
    result["maxrss_mib"] = meter.process_peak_mib()
    result["stages"] = meter.stages
    streamed = np.load(cfg["scores_in"])
    result["max_abs_diff_vs_stream"] = float(np.abs(scores - streamed).max())
    result["bit_identical_to_stream"] = bool(np.array_equal(scores, streamed))
    return result


def analyze(ids, scores, sel, vote_sum, consensus) -> dict:
    """Tie sensitivity at the cutoff and the shape of the synthetic influence columns."""
    n, k = scores.shape
    m = sel.n_selected
    agg = vote_sum.astype(np.float64)
    cutoff = sel.cutoff_score
    above = agg > cutoff
    at = np.flatnonzero(agg == cutoff)
    need = m - int(above.sum())
    at_ids = [ids[i] for i in at.tolist()]
    h = consensus.id_hash(at_ids)
    _, str_rank = np.unique(np.asarray(at_ids, dtype=str), return_inverse=True)
    r2 = consensus._rank_sums2(scores)[at]
    rule_a = sel.selected.copy()
    rule_b = above.copy()
    rule_b[at[np.lexsort([str_rank, h, -r2.max(axis=1)])[:need]]] = True
    rule_c = above.copy()
    rule_c[at[np.lexsort([str_rank, h])[:need]]] = True
    rules = {"a": rule_a, "b": rule_b, "c": rule_c}
    overlap = {f"{x}{y}": int((rules[x] & rules[y]).sum()) / m for x, y in (("a", "b"), ("a", "c"), ("b", "c"))}
    corr = np.corrcoef(scores.T.astype(np.float64))
    levels = np.bincount(vote_sum, minlength=k + 1)
    return {
        "n": n,
        "m": m,
        "cutoff_votes": cutoff,
        "n_above_cutoff": int(above.sum()),
        "n_tied_at_cutoff": sel.n_tied_at_cutoff,
        "n_decided_by_tiebreak": sel.n_decided_by_tiebreak,
        "tiebreak_share": sel.n_decided_by_tiebreak / m,
        "overlap": overlap,
        "mean_offdiag_corr": float((corr.sum() - k) / (k * k - k)),
        "vote_levels": levels.tolist(),
    }


# -- driver ----------------------------------------------------------------------------


def spawn(cfg: dict, script: str = __file__, env: dict | None = None) -> dict:
    """Run ``script --_child cfg`` in a fresh interpreter (its memory its own); its last line of JSON."""
    proc = subprocess.run(
        [sys.executable, script, "--_child", json.dumps(cfg)], capture_output=True, text=True, check=False, env=env
    )
    if proc.returncode != 0:
        raise RuntimeError(f"child {cfg['mode']} failed:\n{proc.stdout}\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def machine() -> str:
    import psutil
    import torch

    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (
        f"{model or platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"{psutil.virtual_memory().total / 2**30:.0f} GiB RAM, torch {torch.__version__} (threads = {{threads}}), "
        f"numpy {np.__version__}, {dt.date.today().isoformat()}"
    )


def print_verification(runs: dict) -> None:
    """The two ways of checking the shards against their manifests' sha256, cold cache each."""
    seconds = lambda r: sum(x["wall_s"] for x in r["stages"].values())  # noqa: E731
    print("Checking every feature file against its manifest (cold page cache before each run; runs interleaved):\n")
    print("| run | stages | wall (each run) | CPU (first run) | peak RSS |")
    print("|---|---|---|---|---|")
    labels = {"hash_then_stream": "sha256 of each file, then the stream (two reads)", "stream_hashed": "the stream hashes what it reads (one read)"}
    for mode, label in labels.items():
        r = runs[mode]
        stages = " + ".join(r[0]["stages"])
        cpu = sum(x["cpu_s"] for x in r[0]["stages"].values())
        print(f"| {label} | {stages} | {', '.join(f'{seconds(x):.2f} s' for x in r)} | {cpu:.2f} s | {max(x['maxrss_mib'] for x in r):.0f} MiB |")
    best = {mode: min(seconds(x) for x in runs[mode]) for mode in labels}
    plain = runs["cold"]["stages"][INFLUENCE_STAGE]["wall_s"]
    same = all(x["sha256"] == runs["hash_then_stream"][0]["sha256"] for mode in labels for x in runs[mode])
    scores = all(x["bit_identical_to_stream"] for mode in labels for x in runs[mode])
    print(
        f"\n- One read instead of two: **{best['hash_then_stream'] / best['stream_hashed']:.2f}x** faster (best of two each); the hashing stream "
        f"against the unhashed cold stream above: {best['stream_hashed'] / plain:.2f}x. Same sha256 both ways: {same}; scores bit-identical: {scores}.\n"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=665_000)
    parser.add_argument("--dim", type=int, default=5120)
    parser.add_argument("--shards", type=int, default=16)
    parser.add_argument("--benchmarks", type=int, default=10)
    parser.add_argument("--p", type=float, default=0.2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--chunk-rows", type=int, default=2048)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--dir", default=DEFAULT_DIR)
    parser.add_argument("--keep", action="store_true", help="keep the synthetic data (default: delete at the end)")
    parser.add_argument("--skip-baselines", action="store_true")
    parser.add_argument("--verify", action="store_true", help="also time checking the files against their sha256 (cold cache each)")
    parser.add_argument("--json", help="also write the run's numbers here (one point of a scaling series over --rows)")
    parser.add_argument("--_child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._child:
        print(json.dumps(child(json.loads(args._child))))
        return

    t_start = time.perf_counter()
    root = Path(args.dir)
    spec_path = root / "spec.json"
    spec = json.loads(spec_path.read_text()) if spec_path.exists() else None
    want = (args.rows, args.dim, args.shards, args.benchmarks)
    if spec is None or (spec["rows"], spec["dim"], len(spec["shards"]), len(spec["groups"])) != want:
        if root.exists():
            shutil.rmtree(root)
        print(f"generating {args.rows:,} x {args.dim} float16 in {args.shards} shards under {root} ...", flush=True)
        spec = generate(root, args.rows, args.dim, args.shards, args.benchmarks)
        generated = f"generated in {spec['generation_s']:.0f} s"
    else:
        generated = "reused from an earlier run"
    paths = spec["shards"]
    base = {"spec": spec, "dir": str(root), "p": args.p, "threads": args.threads, "chunk_rows": args.chunk_rows, "workers": args.workers}
    scores_file = str(root / "scores-stream.npy")

    runs: dict[str, dict] = {}
    before = cached_gib()
    evict(paths)
    evicted = before - cached_gib()
    runs["cold"] = spawn({**base, "mode": "stream", "analyze": True, "scores_out": scores_file})
    warm(paths)
    warm_runs = [spawn({**base, "mode": "stream"}) for _ in range(2)]
    total = lambda r: sum(s["wall_s"] for name, s in r["stages"].items() if name[0].isdigit())  # noqa: E731
    runs["warm"] = min(warm_runs, key=total)
    url_runs = [spawn({**base, "mode": "stream", "via_url": True, "scores_in": scores_file}) for _ in range(2)]  # page cache warm
    runs["url"] = min(url_runs, key=total)
    if not args.skip_baselines:
        runs["naive"] = spawn({**base, "mode": "naive", "scores_in": scores_file})
        runs["memmap"] = spawn({**base, "mode": "memmap", "scores_in": scores_file})
        runs["passes"] = spawn({**base, "mode": "passes", "scores_in": scores_file})
    if args.verify:
        for mode in ("hash_then_stream", "stream_hashed", "hash_then_stream", "stream_hashed"):  # interleaved, twice
            evict(paths)
            runs.setdefault(mode, []).append(spawn({**base, "mode": mode, "scores_in": scores_file}))

    # -- report ------------------------------------------------------------------------
    n, d = spec["rows"], spec["dim"]
    print()
    print("## Consensus at scale (`bench/consensus_scale.py`)\n")
    print(f"Machine: {machine().format(threads=args.threads)}.")
    print(
        f"Data: {n:,} x {d} float16 unit rows in {len(paths)} shards ({generated}); {len(spec['groups'])} benchmarks "
        f"({spec['benchmarks'][0]}), p = {args.p}; streaming with chunk_rows={args.chunk_rows}, workers={args.workers}.\n"
    )
    print("| run | stage | wall | CPU (all threads) | peak RSS |")
    print("|---|---|---|---|---|")
    for key, label in (("warm", "stream, warm cache"), ("cold", "stream, cold cache"), ("url", "stream through fsspec file:// URLs, warm cache")):
        r = runs[key]
        for name, s in r["stages"].items():
            print(f"| {label} | {name} | {s['wall_s']:.2f} s | {s['cpu_s']:.2f} s | {s['peak_rss_mib']:.0f} MiB |")
        stages = [s for name, s in r["stages"].items() if name[0].isdigit()]
        print(
            f"| {label} | **total 1-3** (load avg {r['load_avg']:.1f} at start) | **{sum(s['wall_s'] for s in stages):.2f} s** | "
            f"{sum(s['cpu_s'] for s in stages):.2f} s | **{r['maxrss_mib']:.0f} MiB** (process) |"
        )
    stream_inf = runs["warm"]["stages"][INFLUENCE_STAGE]
    baselines = (
        ("naive", "baseline: np.load whole shard -> float32 -> one matmul"),
        ("memmap", "baseline: memmap + influence_scores per benchmark"),
        ("passes", "baseline: one streaming pass per benchmark (a task_influence run per benchmark)"),
    )
    for key, label in baselines:
        if key not in runs:
            continue
        r = runs[key]
        (s,) = r["stages"].values()
        print(
            f"| {label} (load avg {r['load_avg']:.1f}) | influence only | {s['wall_s']:.2f} s "
            f"(**{s['wall_s'] / stream_inf['wall_s']:.1f}x** stage 1 warm) | {s['cpu_s']:.2f} s | "
            f"{s['peak_rss_mib']:.0f} MiB (**{s['peak_rss_mib'] / stream_inf['peak_rss_mib']:.1f}x** stage 1) |"
        )
    print()
    feat_bytes = sum(os.path.getsize(p) for p in paths)
    cold_inf = runs["cold"]["stages"][INFLUENCE_STAGE]
    print("- Peak RSS is the whole process's (VmHWM, reset per stage); imports + the id list are ~320 MiB of it.")
    print(f"- Warm stream totals of the two runs: {', '.join(f'{total(r):.2f} s' for r in warm_runs)} (the table shows the faster).")
    print(
        f"- Cold: {evicted:.1f} GiB dropped from the page cache before the run; stage 1 read "
        f"{feat_bytes / 2**30:.1f} GiB at {feat_bytes / 2**30 / cold_inf['wall_s']:.2f} GiB/s (disk-bound)."
    )
    url_inf = runs["url"]["stages"][INFLUENCE_STAGE]
    print(
        f"- Through fsspec (file:// URLs, the reads an s3:// store gets): stage 1 {url_inf['wall_s']:.2f} s against {stream_inf['wall_s']:.2f} s "
        f"from local paths in the same run (**{url_inf['wall_s'] / stream_inf['wall_s']:.2f}x**), {feat_bytes / 2**30:.2f} GiB read, "
        f"peak RSS {runs['url']['maxrss_mib']:.0f} MiB against {runs['warm']['maxrss_mib']:.0f} MiB; totals of the two runs: "
        f"{', '.join(f'{total(r):.2f} s' for r in url_runs)}."
    )
    checks = [f"per-shard, per-benchmark `influence_scores` (shard 0): {runs['cold']['bit_identical_to_influence_scores_shard0']}"]
    checks.append(f"the same stream through fsspec URLs: {runs['url']['bit_identical_to_stream']}")
    for key in ("memmap", "passes", "naive"):
        if key in runs:
            r = runs[key]
            checks.append(f"{key} baseline: {r['bit_identical_to_stream']} (max |diff| {r['max_abs_diff_vs_stream']:.1e})")
    print(f"- Streamed scores bit-identical to: {'; '.join(checks)}.")
    print()
    if args.verify:
        print_verification(runs)
    a = runs["cold"]["analysis"]
    print("Tie sensitivity (vote, p = %g, m = %s):\n" % (args.p, f"{a['m']:,}"))
    print("| quantity | value |")
    print("|---|---|")
    print(f"| vote levels 0..{len(a['vote_levels']) - 1} (rows) | {', '.join(f'{v:,}' for v in a['vote_levels'])} |")
    print(f"| cutoff vote sum; rows above it | {a['cutoff_votes']:.0f}; {a['n_above_cutoff']:,} |")
    print(f"| rows tied at the cutoff | {a['n_tied_at_cutoff']:,} |")
    print(f"| selected rows decided by the tie-break (n_decided_by_tiebreak / n_selected) | {a['n_decided_by_tiebreak']:,} / {a['m']:,} = **{a['tiebreak_share']:.1%}** |")
    o = a["overlap"]
    need = a["m"] - a["n_above_cutoff"]

    def tied_part(share: float) -> str:  # agreement on the places the tie-break fills
        return f"{(share * a['m'] - a['n_above_cutoff']) / need:.1%}"

    print(f"| overlap of selected sets, (a) documented rule vs (b) max percentile rank (on the tie-filled places) | {o['ab']:.2%} ({tied_part(o['ab'])}) |")
    print(f"| overlap (a) vs (c) pure id-hash | {o['ac']:.2%} ({tied_part(o['ac'])}) |")
    print(f"| overlap (b) vs (c) | {o['bc']:.2%} ({tied_part(o['bc'])}) |")
    print(f"| chance agreement on the tie-filled places (places / tied rows) | {need / a['n_tied_at_cutoff']:.1%} |")
    print(f"| mean correlation between benchmarks' influence columns (synthetic) | {a['mean_offdiag_corr']:.2f} |")
    print()
    from icons_dagster.core.storage.npy import npy_info

    header = npy_info(paths[0]).offset
    parquet = sum(os.path.getsize(Path(p).parent / SAMPLES) for p in paths)
    print("Storage per training sample:\n")
    print("| file | bytes per sample |")
    print("|---|---|")
    print(f"| features-checkpoint-c.npy (float16, d'={d}), per checkpoint | {feat_bytes / n:.3f} (= 2 x {d} + {header}-byte header / {n // len(paths):,} rows) |")
    print(f"| samples.parquet (id, n_tokens, n_answer_tokens, subtask, grad_norm_0, loss_0) | {parquet / n:.1f} (+ ~8 per extra checkpoint: grad_norm_c, loss_c float32) |")
    print()
    print(f"Benchmark wall time (generation + all runs): {time.perf_counter() - t_start:.0f} s")
    if args.json:
        point = {"rows": n, "dim": d, "shards": len(paths), "benchmarks": len(spec["groups"]), "feature_bytes": feat_bytes, "machine": machine().format(threads=args.threads)}
        for key in ("warm", "cold", "url"):
            point[key] = {"stages": runs[key]["stages"], "total_s": total(runs[key]), "maxrss_mib": runs[key]["maxrss_mib"], "load_avg": runs[key]["load_avg"]}
        point["cold_read_gib_s"] = feat_bytes / 2**30 / cold_inf["wall_s"]
        Path(args.json).write_text(json.dumps(point, indent=2) + "\n")
    if not args.keep:
        shutil.rmtree(root)
        print(f"deleted {root}")


if __name__ == "__main__":
    main()
