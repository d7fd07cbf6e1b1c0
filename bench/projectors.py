"""Projector cost and fidelity at LLaVA-LoRA scale: CountSketch vs the dense Rademacher reference.

Baseline: ``DenseRademacherProjector`` (every entry of the D x d' matrix is ±1/sqrt(d'),
regenerated from the seeded hash, as TRAK/LESS project). Candidate: ``CountSketchProjector``
with s=1 and s=4 nonzeros per input coordinate. Both are the classes the pipeline uses,
called through ``project_block`` exactly as ``core/features/gradients.py`` calls them: one
``[batch, n]`` block per LoRA parameter (default n = 4096 x 128, an r=128 LoRA matrix),
at its global offset in the D-dimensional gradient.

Method
- Time: each (D, projector) runs in a fresh subprocess, so the first call really starts
  with an empty index cache and ``ru_maxrss`` is not polluted by earlier runs. CountSketch:
  one call over all blocks (builds the per-block hash tables: a one-off cost per process),
  then 3-20 more calls whose minimum is the steady state (median shown too: the machine
  is shared and jitters). At 32M, s=4 tables (1.5 GiB) overflow the default 1 GiB cache,
  so s=4 is also timed with a 2 GiB cache. Dense: its row cache
  (512 MiB) holds ~26k of the D rows, so every call regenerates its rows and one call is
  the steady state; above ``--dense-max-coords`` it is timed on the first coordinates
  only and scaled linearly by D (marked "extrapolated": the cost is the same per block).
  All timings run first, back to back, and each row reports the share of CPU that other
  processes used meanwhile (on 2 cores one busy neighbour stalls torch's 2 threads).
- Memory: peak RSS growth during the calls (``ru_maxrss`` delta after the inputs exist;
  it includes freed temporaries that glibc keeps in its heap) and the bytes held by the
  projector's cache.
- Fidelity: N synthetic per-sample gradients with LoRA-like structure, generated block by
  block and never held whole (400 x 32M floats would be 51 GB). In each block a sample's
  gradient is a sum of 2-4 rank-1 terms u v^T from a shared pool of "topics" (the sample's
  topics and signed weights are fixed across blocks; its per-block scale is log-normal,
  as gradient norms vary by layer) plus Gaussian noise. Exact statistics are accumulated
  blockwise while the same blocks are projected. The validation direction is the mean of
  the first ``--val`` samples (projected: the mean of their projections, by linearity);
  for the other samples we compare the exact cosine with the projected cosine: Spearman
  rank correlation and top-20% selection overlap, the quantity ICONS selection depends
  on. The JL error is random, so the smallest D is run with several projector seeds
  (dense included, as the reference), and the overlap that iid Gaussian cosine errors of
  the measured size would give is printed next to it. For the smallest D only, the full
  N x N Gram matrix is also accumulated (O(N^2 D): 10 TFLOP at 32M, too slow here),
  giving the spread of exact pairwise cosines and the RMS error of projected ones.
  The noise comes from one N x n Gaussian bank whose rows are re-permuted per block
  (fresh noise per block would double the run time at 32M; exact values are computed
  from the data as generated, so this only affects realism, not correctness).

Peers (``--peers``, needs ``pip install -e '.[bench]'``): the peers' own CPU projectors, timed
and scored on the same gradients in the same run. TRAK (``traker``) ``BasicProjector`` with
both its types (TRAKer picks normal on CPU, rademacher with its CUDA kernel), and dattri's
``random_project`` with its default type (normal; its ``BasicProjector`` is TRAK's code plus
a 1/sqrt(d') scale) and ``random_mask`` (5,120 sampled coordinates, the first stage of its
GraSS projector). Both take the whole vectorized gradient ``[batch, D]``, as their users call
them, and regenerate a D x 100 block of the matrix per 100 output columns on every call
(their default block_size). Above ``--peer-full-max-dim`` a call is timed with only
``--peer-blocks`` of those ceil(d'/100) blocks (the constructor, which generates the first,
is timed apart as setup) and scaled by the block count (marked "extrapolated": every block costs the same). Their
fidelity is scored at the smallest D only, where the N x D matrix they need fits in memory.
Not runnable on CPU: TRAK's ``CudaProjector`` (CUDA + ``fast_jl``) and dattri's sparse JL
(``sjlt``, and ``grass`` = mask + sjlt), which dattri allows on CUDA only; the run prints
their own errors.

Usage: python bench/projectors.py [--quick] [--dims 1000000,8000000,32000000] [--out-dim 5120] [--peers]
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import resource
import subprocess
import sys
import time

import numpy as np
import torch
from scipy.stats import spearmanr

from icons_dagster.core.features.projection import CountSketchProjector, DenseRademacherProjector

MiB = 1 << 20
PEER_BLOCK = 100  # TRAK's and dattri's BasicProjector default block_size (output columns per generated block)
PEER_EXTRA = "pip install -e '.[bench]'"


def peer_specs() -> list[dict]:
    """The peers' own CPU projectors at their defaults: what a TRAK or dattri user gets on a CPU."""
    return [
        {"kind": "trak", "proj_type": "normal"},  # TRAKer's choice on CPU
        {"kind": "trak", "proj_type": "rademacher"},  # TRAKer's choice with CUDA (there via fast_jl)
        {"kind": "dattri", "proj_type": "normal"},  # random_project's default
        {"kind": "dattri", "proj_type": "random_mask"},  # GraSS's first stage, alone
    ]


def is_peer(spec: dict) -> bool:
    return spec["kind"] in ("trak", "dattri")


def build_peer(spec: dict, features: torch.Tensor, out_dim: int, seed: int):
    """The peer's own projector for ``features`` ([batch, D]), called the way its users call it."""
    seed = spec.get("proj_seed", seed)
    if spec["kind"] == "trak":
        from trak.projectors import BasicProjector

        proj = BasicProjector(features.shape[1], out_dim, seed, spec["proj_type"], "cpu")
        return lambda x: proj.project(x, model_id=0)
    from dattri.func.projection import random_project

    # proj_max_batch_size only matters for its CUDA projector
    return random_project(features, features.shape[0], out_dim, 8, proj_seed=seed, proj_type=spec["proj_type"])


def peer_matrix_bytes(spec: dict, dim: int, out_dim: int) -> int:
    """What the peer holds between calls: one D x block_size float32 block, or the mask's indices."""
    return out_dim * 8 if spec["proj_type"] == "random_mask" else dim * min(PEER_BLOCK, out_dim) * 4


def peer_unavailable() -> list[str]:
    """The peers' own errors for their projectors that need a GPU (printed in the notes)."""
    from dattri.func.projection import random_project
    from trak.projectors import CudaProjector

    notes = []
    try:
        CudaProjector(1000, 512, 0, "rademacher", torch.device("cpu"), 8)
    except Exception as e:  # noqa: BLE001 - the message is the result
        notes.append(f"TRAK CudaProjector: {type(e).__name__}: {e} (fast_jl installed: "
                     f"{importlib.util.find_spec('fast_jl') is not None}; it is a CUDA extension)")
    for proj_type in ("sjlt", "grass"):
        try:
            random_project(torch.zeros(8, 1000), 8, 512, 8, proj_type=proj_type, device="cpu")
        except Exception as e:  # noqa: BLE001
            notes.append(f"dattri {proj_type}: {type(e).__name__}: {' '.join(str(e).split())} "
                         f"(sjlt installed: {importlib.util.find_spec('sjlt') is not None}; it is a CUDA extension)")
    return notes


def block_layout(dim: int, block_coords: int, limit: int | None = None) -> list[tuple[int, int]]:
    """(offset, n) per parameter block, as the LoRA hooks deliver them; optionally only the first ``limit`` coords."""
    end = dim if limit is None else min(dim, limit)
    return [(o, min(block_coords, end - o)) for o in range(0, end, block_coords)]


def build_projector(spec: dict, out_dim: int, seed: int):
    """The pipeline's classes with their default caches unless the spec overrides them."""
    seed = spec.get("proj_seed", seed)
    if spec["kind"] == "countsketch":
        kw = {} if spec.get("cache_bytes") is None else {"cache_bytes": spec["cache_bytes"]}
        return CountSketchProjector(out_dim, seed, nnz_per_coord=spec["s"], **kw)
    return DenseRademacherProjector(out_dim, seed)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def maxrss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


class OtherLoad:
    """Share of the machine's CPU used by other processes (and VM steal) while timing.

    The dev machine is shared; with 2 cores and 2 torch threads any other busy process
    stalls torch's parallel regions, so each timing row reports how contended it was.
    """

    def __init__(self):
        self.tick = os.sysconf("SC_CLK_TCK")
        self.start = self._read()

    def _read(self) -> tuple[float, float, float]:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        user, nice, system, idle, iowait, irq, softirq, steal = (v + [0] * 8)[:8]
        t = os.times()
        return user + nice + system + irq + softirq + steal, idle + iowait, (t.user + t.system) * self.tick

    def fraction(self) -> float:
        busy, idle, own = (b - a for a, b in zip(self.start, self._read()))
        total = busy + idle
        return max(0.0, (busy - own) / total) if total > 0 else 0.0


def current_rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


# ---------------------------------------------------------------- timing worker


def timing_job(job: dict) -> dict:
    """Time ``project_block`` over one batch in a fresh process (cold cache, clean maxrss)."""
    if is_peer(job["spec"]):
        return peer_timing_job(job)
    torch.set_num_threads(job["threads"])
    torch.manual_seed(job["seed"])
    dim, out_dim, batch = job["dim"], job["out_dim"], job["batch"]
    spec = job["spec"]
    dense = spec["kind"] == "rademacher"
    layout = block_layout(dim, job["block_coords"], job["dense_max_coords"] if dense else None)
    covered = sum(n for _, n in layout)
    blocks = [(o, torch.randn(batch, n)) for o, n in layout]
    proj = build_projector(spec, out_dim, job["seed"])
    out = torch.zeros(batch, out_dim)

    def one_call() -> float:
        start = time.perf_counter()
        for offset, block in blocks:
            proj.project_block(block, offset, out)
        return time.perf_counter() - start

    if dense:
        # Warm the allocator on one chunk outside the timed range, so the timed call is
        # the steady state (the row cache cannot hold the timed range anyway).
        proj.project_block(torch.randn(batch, 4096), covered, out)
        proj.clear_cache()
    base = max(maxrss_bytes(), current_rss_bytes())
    load = OtherLoad()
    first = one_call()
    steady = [first] if dense else []
    spent = 0.0
    # At least --repeats calls (fewer if they exceed the budget); cheap calls are repeated
    # up to 20 times within 2 s, since this 2-core VM's timings jitter by ~2x per call.
    while not dense and len(steady) < 20 and (
        (len(steady) < job["repeats"] and spent < job["repeat_budget_s"]) or spent < 2.0
    ):
        steady.append(one_call())
        spent += steady[-1]
    peak_extra = max(0, maxrss_bytes() - base)
    other_load = load.fraction()
    split = None
    if dense:
        # Where the dense time goes: regenerating one chunk of rows vs multiplying by it.
        c = proj.chunk_coords
        t0 = time.perf_counter()
        p_rows = torch.from_numpy(proj.rows(0, c))
        t1 = time.perf_counter()
        out.addmm_(blocks[0][1][:, :c], p_rows)
        split = (t1 - t0) / (time.perf_counter() - t0)
    return {
        "rows_fraction": split,
        "other_load": other_load,
        "first_s": first * dim / covered,
        "steady_s": min(steady) * dim / covered,
        "steady_median_s": float(np.median(steady)) * dim / covered,
        "covered": covered,
        "extrapolated": covered < dim,
        "peak_extra_bytes": peak_extra,
        "cache_bytes": proj._cache._bytes,  # noqa: SLF001 - a benchmark may look inside
        "cache_limit": proj._cache.max_bytes,  # noqa: SLF001
        "steady_calls": len(steady),
    }


def peer_timing_job(job: dict) -> dict:
    """Time a peer's own projector on the same batch as ours, whole ([batch, D]) as its API takes it."""
    torch.set_num_threads(job["threads"])
    torch.manual_seed(job["seed"])
    dim, out_dim, batch, spec = job["dim"], job["out_dim"], job["batch"], job["spec"]
    x = torch.empty(batch, dim)
    for offset, n in block_layout(dim, job["block_coords"]):  # the same draws, in the same order, as ours
        x[:, offset : offset + n] = torch.randn(batch, n)
    full_blocks = math.ceil(out_dim / PEER_BLOCK)
    timed_blocks = full_blocks
    if spec["proj_type"] != "random_mask" and dim > job["peer_full_max_dim"]:
        timed_blocks = min(full_blocks, max(2, job["peer_blocks"]))  # 1 block would skip regeneration
    timed_out = min(out_dim, timed_blocks * PEER_BLOCK)
    base = max(maxrss_bytes(), current_rss_bytes())
    load = OtherLoad()
    start = time.perf_counter()
    project = build_peer(spec, x, timed_out, job["seed"])
    setup = time.perf_counter() - start
    steady, spent = [], 0.0
    # Every call regenerates the whole matrix, so the first call is steady already; cheap
    # calls are repeated like ours.
    while len(steady) < 20 and (not steady or (len(steady) < job["repeats"] and spent < job["repeat_budget_s"]) or spent < 2.0):
        start = time.perf_counter()
        project(x)
        steady.append(time.perf_counter() - start)
        spent += steady[-1]
    scale = full_blocks / timed_blocks
    return {
        "other_load": load.fraction(),
        "setup_s": setup,
        "steady_s": min(steady) * scale,
        "steady_median_s": float(np.median(steady)) * scale,
        "timed_blocks": timed_blocks,
        "full_blocks": full_blocks,
        "extrapolated": timed_blocks < full_blocks,
        "peak_extra_bytes": max(0, maxrss_bytes() - base),
        "cache_bytes": peer_matrix_bytes(spec, dim, out_dim),
        "steady_calls": len(steady),
    }


# -------------------------------------------------------------- fidelity worker


def fidelity_job(job: dict) -> dict:
    """Exact vs projected cosines to a validation mean, blockwise, for several projectors."""
    torch.set_num_threads(job["threads"])
    torch.manual_seed(job["seed"])
    rng = np.random.default_rng(job["seed"])
    dim, out_dim, N, n_val, r = job["dim"], job["out_dim"], job["samples"], job["val"], job["lora_r"]
    pool, batch = job["pool"], job["batch"]
    peer_specs_ = [s for s in job["specs"] if is_peer(s)]
    specs = [s for s in job["specs"] if not is_peer(s)] + peer_specs_
    layout = block_layout(dim, job["block_coords"])
    nmax = max(n for _, n in layout)

    # A sample's topics and signed weights are its "content": fixed across blocks.
    popularity = 1.0 / np.arange(1, pool + 1)
    popularity /= popularity.sum()
    weights = np.zeros((N, pool), dtype=np.float32)
    for i in range(N):
        k = rng.integers(2, 5)
        topics = rng.choice(pool, size=k, replace=False, p=popularity)
        weights[i, topics] = rng.normal(0.0, 1.0, size=k)
    weights_t = torch.from_numpy(weights)
    bank = torch.randn(N, nmax)  # noise bank, rows re-permuted per block

    projectors = [build_projector(s, out_dim, job["seed"]) for s in specs if not is_peer(s)]
    # The peers take the whole [N, D] gradient matrix: kept here as generated (1.6 GB at 1M).
    whole = torch.empty(N, dim) if peer_specs_ else None
    feats = [torch.zeros(N, out_dim) for _ in specs]
    dots = torch.zeros(N, dtype=torch.float64)  # <x_i, m>
    sq = torch.zeros(N, dtype=torch.float64)  # ||x_i||^2
    msq = 0.0  # ||m||^2
    gram = torch.zeros(N, N, dtype=torch.float64) if job["gram"] else None
    x_buf = torch.empty(N, nmax)
    noise_buf = torch.empty(N, nmax)
    proj_s = [0.0 for _ in specs]
    t0 = time.perf_counter()
    for b, (offset, n) in enumerate(layout):
        rows = -(-n // r)
        u = torch.randn(pool, rows, 1)
        v = torch.randn(pool, 1, r)
        topics = ((u * v).reshape(pool, -1)[:, :n] / math.sqrt(rows * r)).contiguous()
        scale = torch.from_numpy(np.exp(rng.normal(0.0, 0.5, size=(N, 1))).astype(np.float32))
        x = x_buf[:, :n]
        torch.mm(weights_t * scale, topics, out=x)
        # Noise energy = noise_ratio x the sample's signal energy in this block.
        signal_sq = x.square().sum(1, keepdim=True)
        sigma = (job["noise_ratio"] * signal_sq / n).sqrt()
        noise = noise_buf[:, :n]
        torch.index_select(bank[:, :n], 0, torch.randperm(N), out=noise)
        x.addcmul_(noise, sigma)

        m = x[:n_val].mean(0)
        dots += (x @ m).double()
        sq += x.square().sum(1).double()
        msq += float(m.double().square().sum())
        if gram is not None:
            gram += (x @ x.T).double()
        if whole is not None:
            whole[:, offset : offset + n] = x
        for j, (proj, f) in enumerate(zip(projectors, feats)):
            start = time.perf_counter()
            # CountSketch in pipeline-sized batches (small temporaries, same cost per row);
            # dense in one call, since every call regenerates its rows.
            step = N if isinstance(proj, DenseRademacherProjector) else batch
            for i0 in range(0, N, step):
                proj.project_block(x[i0 : i0 + step], offset, f[i0 : i0 + step])
            proj_s[j] += time.perf_counter() - start
        if (b + 1) % 8 == 0 or b + 1 == len(layout):
            print(f"    fidelity D={dim:,}: block {b + 1}/{len(layout)}, {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    for j, spec in enumerate(peer_specs_, start=len(projectors)):
        start = time.perf_counter()
        feats[j] = build_peer(spec, whole, out_dim, job["seed"])(whole)
        proj_s[j] += time.perf_counter() - start
        print(f"    fidelity D={dim:,}: {spec_name(spec)} seed {spec.get('proj_seed')}, {proj_s[j]:.0f} s", file=sys.stderr, flush=True)
    del whole

    cand = slice(n_val, N)
    exact = (dots / (sq * msq).sqrt())[cand].numpy()
    k = max(1, round(job["top_frac"] * (N - n_val)))
    top_exact = set(np.argsort(-exact)[:k].tolist())
    results = []
    for spec, f, secs in zip(specs, feats, proj_s):
        f = f.double()
        m = f[:n_val].mean(0)
        approx = ((f @ m) / (f.norm(dim=1) * m.norm()))[cand].numpy()
        top_approx = set(np.argsort(-approx)[:k].tolist())
        row = {
            "spec": spec,
            "spearman": float(spearmanr(exact, approx).statistic),
            "overlap": len(top_exact & top_approx) / k,
            "max_abs_err": float(np.abs(exact - approx).max()),
            "rms_err": float(np.sqrt(np.mean((exact - approx) ** 2))),
            "project_s": secs,
        }
        if gram is not None:
            g = f @ f.T
            d = g.diagonal().sqrt()
            pc = g / d[:, None] / d[None, :]
            iu = torch.triu_indices(N, N, 1)
            dg = gram.diagonal().sqrt()
            ec = (gram / dg[:, None] / dg[None, :])[iu[0], iu[1]]
            row["pair_rms_err"] = float((pc[iu[0], iu[1]] - ec).square().mean().sqrt())
        results.append(row)
    # What any unbiased projection with this cosine error would score: exact + iid Gaussian
    # noise of the measured RMS size (so a low overlap can be told apart from a bad sketch).
    sim_rng = np.random.default_rng(job["seed"] + 1)
    rms = float(np.mean([r["rms_err"] for r in results if not is_peer(r["spec"])]))
    sims = [
        len(top_exact & set(np.argsort(-(exact + sim_rng.normal(0.0, rms, exact.shape)))[:k].tolist())) / k
        for _ in range(2000)
    ]
    out = {
        "results": results, "k": k, "exact_q": np.quantile(exact, [0.05, 0.5, 0.95]).tolist(),
        "noise_model": {"rms": rms, "overlap_mean": float(np.mean(sims)), "overlap_q": np.quantile(sims, [0.05, 0.95]).tolist()},
    }
    if gram is not None:
        dg = gram.diagonal().sqrt()
        iu = torch.triu_indices(N, N, 1)
        ec = (gram / dg[:, None] / dg[None, :])[iu[0], iu[1]].numpy()
        out["pair_q"] = np.quantile(ec, [0.05, 0.5, 0.95]).tolist()
    out["project_s"] = sum(proj_s)
    out["seconds"] = time.perf_counter() - t0
    return out


# ------------------------------------------------------------------------ driver


def run_worker(job: dict) -> dict:
    """Run one job in a fresh interpreter: cold caches and an uncontaminated ru_maxrss."""
    proc = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--_worker", json.dumps(job)],
        stdout=subprocess.PIPE,
        check=True,
        text=True,
    )
    return json.loads(proc.stdout.strip().splitlines()[-1])


def spec_name(spec: dict) -> str:
    if spec["kind"] == "trak":
        return f"TRAK BasicProjector ({spec['proj_type']})"
    if spec["kind"] == "dattri":
        return f"dattri random_project ({spec['proj_type']})"
    if spec["kind"] == "rademacher":
        return "dense Rademacher"
    name = f"CountSketch s={spec['s']}"
    if spec.get("cache_bytes") is not None:
        name += f" (cache {spec['cache_bytes'] / (1 << 30):g} GiB)"
    return name


def spread(values: list[float], digits: int) -> str:
    """Mean, and the min-max over projector seeds when there are several."""
    mean = f"{np.mean(values):.{digits}f}"
    return mean if len(values) == 1 else f"{mean} ({min(values):.{digits}f}-{max(values):.{digits}f})"


def fmt_ms(seconds: float) -> str:
    return f"{seconds * 1e3:,.0f}" if seconds >= 0.01 else f"{seconds * 1e3:.2f}"


def fmt_ratio(r: float) -> str:
    """Large ratios whole, small ones as 1/N (dattri's mask is far faster than any projection)."""
    return f"{r:,.0f}x" if r >= 10 else f"{r:.2f}x" if r >= 0.1 else f"1/{1 / r:,.0f}x"


def fmt_mib(b: float) -> str:
    return f"{b / MiB:,.0f} MiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dims", default="1000000,8000000,32000000")
    parser.add_argument("--out-dim", type=int, default=5120)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--block-coords", type=int, default=4096 * 128)
    parser.add_argument("--lora-r", type=int, default=128)
    parser.add_argument("--samples", type=int, default=400)
    parser.add_argument("--val", type=int, default=20)
    parser.add_argument("--top-frac", type=float, default=0.2)
    parser.add_argument("--pool", type=int, default=32, help="shared rank-1 directions per block")
    parser.add_argument("--noise-ratio", type=float, default=0.5, help="noise energy / low-rank energy")
    parser.add_argument("--dense-max-coords", type=int, default=2 * 4096 * 128)
    parser.add_argument("--fidelity-seeds", type=int, default=3, help="projector seeds at the smallest D")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--repeat-budget-s", type=float, default=20.0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="smoke run: D=1M, N=200")
    parser.add_argument("--no-fidelity", action="store_true")
    parser.add_argument("--peers", action="store_true", help=f"also TRAK's and dattri's own projectors ({PEER_EXTRA})")
    parser.add_argument("--peer-full-max-dim", type=int, default=1_000_000, help="above: peers timed on --peer-blocks blocks")
    parser.add_argument("--peer-blocks", type=int, default=2, help="of the peers' ceil(d'/100) blocks per call, when extrapolating")
    parser.add_argument("--peer-fidelity-max-bytes", type=int, default=4 << 30, help="the N x D matrix the peers need")
    parser.add_argument("--_worker", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args._worker:
        job = json.loads(args._worker)
        fn = timing_job if job["type"] == "timing" else fidelity_job
        print(json.dumps(fn(job)))
        return

    if args.quick:
        args.dims, args.samples, args.fidelity_seeds = "1000000", 200, 1
    if args.peers and not all(importlib.util.find_spec(m) for m in ("trak", "dattri")):
        sys.exit(f"--peers needs TRAK's and dattri's packages (traker, dattri): {PEER_EXTRA}")
    dims = sorted(int(d) for d in args.dims.split(","))
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    common = {
        "out_dim": args.out_dim, "batch": args.batch, "block_coords": args.block_coords,
        "threads": args.threads, "seed": args.seed,
    }
    default_cache = CountSketchProjector(args.out_dim, 0)._cache.max_bytes  # noqa: SLF001
    rows, notes, peer_rows = [], [], []
    # All timings first, back to back (a few minutes), then the slower fidelity passes:
    # the machine is shared, and a short timing phase is likelier to catch a quiet spell.
    specs_by_dim, timing_by_dim = {}, {}
    for dim in dims:
        specs = [{"kind": "countsketch", "s": 1}, {"kind": "countsketch", "s": 4}]
        if dim * 4 * 12 > default_cache:  # s=4 tables (int64 + float32) overflow the default LRU
            specs.append({"kind": "countsketch", "s": 4, "cache_bytes": 1 << 31})
        specs.append({"kind": "rademacher"})
        if args.peers:
            specs += peer_specs()
        specs_by_dim[dim] = specs
        timing = timing_by_dim[dim] = {}
        for spec in specs:
            print(f"  timing D={dim:,} {spec_name(spec)} ...", file=sys.stderr, flush=True)
            timing[spec_name(spec)] = spec, run_worker({
                "type": "timing", "dim": dim, "spec": spec, "repeats": args.repeats,
                "repeat_budget_s": args.repeat_budget_s, "dense_max_coords": args.dense_max_coords,
                "peer_full_max_dim": args.peer_full_max_dim, "peer_blocks": args.peer_blocks, **common,
            })
    for dim in dims:
        specs, timing = specs_by_dim[dim], timing_by_dim[dim]
        fid: dict[str, list[dict]] = {}
        if not args.no_fidelity:
            # Several projector seeds at the smallest D (the JL error is random, so one seed's
            # overlap can swing by a few ranks); one seed above, as a check at scale.
            seeds = range(args.seed, args.seed + (args.fidelity_seeds if dim == dims[0] else 1))
            fspecs = [s for s in specs if s["kind"] == "countsketch" and s.get("cache_bytes") is None]
            if dim == dims[0]:
                fspecs.append({"kind": "rademacher"})
                if args.peers and args.samples * dim * 4 <= args.peer_fidelity_max_bytes:
                    fspecs += peer_specs()
            fspecs = [{**s, "proj_seed": k} for s in fspecs for k in seeds]
            print(f"  fidelity D={dim:,} N={args.samples}, {len(seeds)} projector seed(s) ...", file=sys.stderr, flush=True)
            f = run_worker({
                "type": "fidelity", "dim": dim, "specs": fspecs, "samples": args.samples, "val": args.val,
                "top_frac": args.top_frac, "pool": args.pool, "noise_ratio": args.noise_ratio,
                "lora_r": args.lora_r, "gram": dim == dims[0], **common,
            })
            for r in f["results"]:
                fid.setdefault(spec_name(r["spec"]), []).append(r)
            q = f["exact_q"]
            note = (f"D={dim:,}: exact cosine to the validation mean over {args.samples - args.val} candidates "
                    f"p5/p50/p95 = {q[0]:.3f}/{q[1]:.3f}/{q[2]:.3f}; top-20% = top {f['k']}; "
                    f"{len(seeds)} projector seed(s); fidelity pass {f['seconds']:.0f} s "
                    f"({f['project_s']:.0f} s of it projecting); RMS error of the projected cosine "
                    f"{f['noise_model']['rms']:.4f}, for which iid Gaussian errors give top-20% overlap "
                    f"{f['noise_model']['overlap_mean']:.3f} (5-95%: {f['noise_model']['overlap_q'][0]:.3f}-"
                    f"{f['noise_model']['overlap_q'][1]:.3f})")
            if "pair_q" in f:
                p = f["pair_q"]
                errs = ", ".join(
                    f"{name} {np.mean([r['pair_rms_err'] for r in rs]):.4f}" for name, rs in fid.items()
                )
                note += (f"; exact pairwise cosines p5/p50/p95 = {p[0]:.3f}/{p[1]:.3f}/{p[2]:.3f}; "
                         f"RMS error of projected pairwise cosines (1/sqrt(d') = {args.out_dim ** -0.5:.4f}): {errs}")
            notes.append(note)
        dense_t = timing["dense Rademacher"][1]
        if dim == dims[0]:
            notes.insert(0, f"dense Rademacher: {dense_t['rows_fraction']:.0%} of its time is regenerating the "
                            f"±1 rows from the hash (numpy), the rest the matmul")
        for name, (spec, t) in timing.items():
            if is_peer(spec):
                continue
            thrash = spec["kind"] == "countsketch" and dim * spec["s"] * 12 > t["cache_limit"]
            steady = f"{t['steady_s'] * 1e3:,.0f}"
            if t["extrapolated"]:
                steady += f" (extrapolated from {t['covered']:,} coords)"
            else:
                steady += f" ({t['steady_median_s'] * 1e3:,.0f})"
            if thrash:
                steady += " LRU thrash"
            rs = fid.get(name)
            rows.append([
                f"{dim:,}", name,
                "-" if name.startswith("dense") else f"{t['first_s']:.2f}",
                steady,
                f"{dense_t['steady_s'] / t['steady_s']:,.0f}x",
                f"{fmt_mib(t['cache_bytes'])} / +{fmt_mib(t['peak_extra_bytes'])}",
                "-" if not rs else spread([r["spearman"] for r in rs], 4),
                "-" if not rs else spread([r["overlap"] for r in rs], 3),
                f"{t['other_load']:.0%}",
            ])
        if args.peers:
            ours = timing["CountSketch s=1"][1]
            for name, (spec, t) in timing.items():
                if not (is_peer(spec) or name == "CountSketch s=1"):
                    continue
                steady = f"{fmt_ms(t['steady_s'])} ({fmt_ms(t['steady_median_s'])})"
                if t["extrapolated"]:
                    steady += f" (extrapolated from {t['timed_blocks']} of {t['full_blocks']} blocks)"
                rs = fid.get(name)
                peer_rows.append([
                    f"{dim:,}", name,
                    f"{t['setup_s']:.2f}" if is_peer(spec) else f"{t['first_s']:.2f}",
                    steady,
                    fmt_ms(t["steady_s"] / args.batch),
                    fmt_ratio(t["steady_s"] / ours["steady_s"]),
                    f"{fmt_mib(t['cache_bytes'])} / +{fmt_mib(t['peak_extra_bytes'])}",
                    "-" if not rs else spread([r["spearman"] for r in rs], 4),
                    "-" if not rs else spread([r["overlap"] for r in rs], 3),
                    f"{t['other_load']:.0%}",
                ])

    header = ["D", "projector", "first call (s)", "steady ms / batch of 8: min (median)", "speed-up vs dense (min)",
              "index cache / peak extra RSS", "Spearman", "top-20% overlap", "others' CPU while timing"]
    print()
    print(f"machine: {platform.machine()} {cpu_model()}, {os.cpu_count()} cores, "
          f"torch {torch.__version__} threads {args.threads}; d'={args.out_dim}, batch {args.batch}, "
          f"blocks of {args.block_coords:,} coords (LoRA r={args.lora_r}); fidelity N={args.samples}, "
          f"validation mean of {args.val}")
    print()
    print_table(header, rows)
    print("- dense Rademacher: one timed call (its 512 MiB row cache holds ~26k of the D rows, so every call "
          "regenerates them); above --dense-max-coords its time is measured on the first coordinates and "
          "scaled linearly by D (extrapolated, as marked).")
    print("- CountSketch first call includes building the per-block hash tables (one-off per process); "
          "steady = min (median) over 3-20 repeated calls; the machine is shared, so the min is the cleanest "
          "estimate. 'LRU thrash': the s=4 tables exceed the default 1 GiB cache, so a sequential pass evicts "
          "every block before its reuse and each call rebuilds them.")
    print("- fidelity: Spearman / top-20% overlap of exact vs projected cosines of each candidate to the "
          "validation mean; at the smallest D mean (min-max) over projector seeds, with dense as the reference.")
    for note in notes:
        print(f"- {note}")
    print("- others' CPU while timing: share of the 2 cores used by other processes (or VM steal) during that "
          "row's timed calls; above ~10% the row's times are inflated.")
    if args.peers:
        print_peers(args, peer_rows)
    print(f"- total runtime {time.perf_counter() - t_start:.0f} s")


def print_table(header: list[str], rows: list[list[str]]) -> None:
    """A Markdown table, then a blank line."""
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(row) + " |")
    print()


def print_peers(args: argparse.Namespace, peer_rows: list[list[str]]) -> None:
    """The peers' table: CountSketch s=1's speed-up is the peer's steady time over ours, same run, same batch."""
    versions = ", ".join(f"{p} {importlib.metadata.version(p)}" for p in ("traker", "dattri", "torch"))
    header = ["D", "projector", "setup / first call (s)", f"steady ms / batch of {args.batch}: min (median)", "ms / sample",
              "CountSketch s=1 speed-up vs it", "matrix or index / peak extra RSS", "Spearman", "top-20% overlap",
              "others' CPU while timing"]
    print()
    print(f"Peers' own projectors ({versions}), on the same batches as ours:")
    print()
    print_table(header, peer_rows)
    print(f"- peers: setup = the constructor (it generates the first D x {PEER_BLOCK} block, or the mask); every call "
          f"regenerates all ceil(d'/{PEER_BLOCK}) blocks, so one call is the steady state. Above D = "
          f"{args.peer_full_max_dim:,} a call is timed with {args.peer_blocks} blocks (proj_dim = "
          f"{args.peer_blocks * PEER_BLOCK}) and scaled by the block count (extrapolated, as marked). Fidelity only where "
          f"the N x D matrix they take fits in {args.peer_fidelity_max_bytes / (1 << 30):g} GiB (the smallest D).")
    for note in peer_unavailable():
        print(f"- not runnable here: {note}")


if __name__ == "__main__":
    main()
