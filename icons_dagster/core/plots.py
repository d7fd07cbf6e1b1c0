"""Small deterministic PNG charts for Dagster metadata (embedded as markdown data URIs).

Uses ``matplotlib.figure.Figure`` with the Agg canvas directly, so no pyplot global
state or GUI backend is touched, and saves with ``metadata={"Software": None}`` so the
same input gives byte-identical PNGs (stable metadata, cacheable, testable).
"""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from matplotlib.figure import Figure

_FIGSIZE = (5.0, 3.5)
# 800x560 px: the UI's [Show Markdown] dialog shows an image at its own size, so this is
# what a user reads (80 dpi gave 400x280, too small to read the axes: issue 20)
_DPI = 160


def _new_figure(figsize: tuple[float, float] = _FIGSIZE) -> Figure:
    # imported here: half a second that loading the code location (every run worker) skips
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, dpi=_DPI)
    FigureCanvasAgg(fig)
    return fig


def _to_png(fig: Figure) -> bytes:
    """Render to PNG without version/time metadata so bytes are reproducible."""
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=_DPI, metadata={"Software": None})
    return buf.getvalue()


def histogram_png(
    values: np.ndarray, title: str, xlabel: str, threshold: float | None = None, bins: int = 40
) -> bytes:
    """Histogram of scores (e.g. influence or consensus votes), with an optional cut line."""
    vals = np.asarray(values, dtype=np.float64).reshape(-1)
    vals = vals[np.isfinite(vals)]
    fig = _new_figure()
    ax = fig.add_subplot(1, 1, 1)
    if vals.size:
        lo, hi = float(vals.min()), float(vals.max())
        if lo == hi:  # constant input: give the single bar some width
            lo, hi = lo - 0.5, hi + 0.5
        ax.hist(vals, bins=max(1, int(bins)), range=(lo, hi), color="#4C72B0")
    else:
        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
    if threshold is not None and np.isfinite(threshold):
        ax.axvline(float(threshold), color="#C44E52", linestyle="--", linewidth=1.2, label=f"threshold {threshold:.4g}")
        ax.legend(fontsize=7, loc="upper right")
    ax.set_title(title, fontsize=9)
    ax.set_xlabel(xlabel, fontsize=8)
    ax.set_ylabel("count", fontsize=8)
    ax.tick_params(labelsize=7)
    return _to_png(fig)


def votes_histogram_png(vote_sums: np.ndarray, n_benchmarks: int, selected: np.ndarray | None = None) -> bytes:
    """Bar chart of samples per vote count 0..K; stacked selected / not selected when given.

    Makes the consensus cut visible: selected samples should sit at the high-vote end.
    """
    sums = np.asarray(vote_sums).reshape(-1).astype(np.int64)
    k = int(n_benchmarks)
    counts_x = np.arange(k + 1)
    fig = _new_figure()
    ax = fig.add_subplot(1, 1, 1)
    clipped = np.clip(sums, 0, k)
    if selected is None:
        counts = np.bincount(clipped, minlength=k + 1)[: k + 1]
        ax.bar(counts_x, counts, color="#4C72B0")
    else:
        sel = np.asarray(selected, dtype=bool).reshape(-1)
        if sel.shape[0] != sums.shape[0]:
            raise ValueError(f"selected has {sel.shape[0]} entries but vote_sums has {sums.shape[0]}")
        sel_counts = np.bincount(clipped[sel], minlength=k + 1)[: k + 1]
        rest_counts = np.bincount(clipped[~sel], minlength=k + 1)[: k + 1]
        ax.bar(counts_x, rest_counts, color="#BBBBBB", label="not selected")
        ax.bar(counts_x, sel_counts, bottom=rest_counts, color="#55A868", label="selected")
        ax.legend(fontsize=7, loc="upper right")
    ax.set_xticks(counts_x)
    ax.set_title(f"votes per sample ({k} benchmarks)", fontsize=9)
    ax.set_xlabel("votes", fontsize=8)
    ax.set_ylabel("samples", fontsize=8)
    ax.tick_params(labelsize=7)
    return _to_png(fig)


def heatmap_png(matrix: np.ndarray, labels: Sequence[str], title: str, fmt: str = "{:.0%}") -> bytes:
    """Square annotated heatmap, e.g. pairwise overlap of per-benchmark top-p selections."""
    mat = np.asarray(matrix, dtype=np.float64)
    if mat.ndim != 2 or mat.shape[0] != mat.shape[1] or mat.shape[0] != len(labels):
        raise ValueError(f"matrix shape {mat.shape} does not match {len(labels)} labels")
    n = mat.shape[0]
    side = max(3.5, min(8.0, 1.5 + 0.5 * n))
    fig = _new_figure((side + 0.8, side))
    ax = fig.add_subplot(1, 1, 1)
    if n:
        finite = mat[np.isfinite(mat)]
        vmin = float(min(0.0, finite.min())) if finite.size else 0.0
        vmax = float(max(1.0, finite.max())) if finite.size else 1.0
        im = ax.imshow(mat, vmin=vmin, vmax=vmax, cmap="viridis")
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
        ax.set_xticks(np.arange(n))
        ax.set_yticks(np.arange(n))
        ax.set_xticklabels([str(x) for x in labels], rotation=45, ha="right", fontsize=7)
        ax.set_yticklabels([str(x) for x in labels], fontsize=7)
        mid = (vmin + vmax) / 2
        for i in range(n):
            for j in range(n):
                v = mat[i, j]
                text = fmt.format(v) if np.isfinite(v) else "n/a"
                ax.text(j, i, text, ha="center", va="center", fontsize=7,
                        color="black" if np.isfinite(v) and v > mid else "white")
    else:
        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
    ax.set_title(title, fontsize=9)
    return _to_png(fig)


def markdown_image(png: bytes, alt: str) -> str:
    """Markdown image with an inline data URI, which Dagster's UI renders in metadata."""
    return f"![{alt}](data:image/png;base64,{base64.b64encode(png).decode('ascii')})"
