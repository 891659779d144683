"""Matplotlib figures for the notebooks; each function returns the Figure and can save a PNG."""
from __future__ import annotations

import os
from pathlib import Path


def save_figure(fig, path: str | os.PathLike | None) -> Path | None:
    """Save `fig` as PNG (atomically) when a path is given; returns the path."""
    if path is None:
        return None
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".partial.png")
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    os.replace(tmp, path)
    return path


def token_length_histogram(lengths, sample_length: int | None = None, title: str = "token lengths",
                           path: str | os.PathLike | None = None):
    """Histogram of examples' / documents' token lengths (log-spaced bins when they span a wide
    range), with the dataset's sample length (seq_length+1) marked and the share above it."""
    import matplotlib.pyplot as plt
    import numpy as np

    lengths = np.asarray(lengths)
    lengths = lengths[lengths > 0]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    if len(lengths) == 0:
        ax.text(0.5, 0.5, "no lengths", ha="center", va="center", transform=ax.transAxes)
        return fig
    lo, hi = int(lengths.min()), int(lengths.max())
    log = hi > 50 * max(lo, 1)
    bins = np.geomspace(max(lo, 1), hi + 1, 40) if log else min(40, hi - lo + 1)
    ax.hist(lengths, bins=bins, color="#4c72b0")
    if log:
        ax.set_xscale("log")
    if sample_length is not None:
        over = float((lengths > sample_length).mean())
        ax.axvline(sample_length, color="#c44e52", linestyle="--",
                   label=f"sample length {sample_length} ({over:.1%} longer)")
        ax.legend(loc="upper right")
    ax.set_xlabel("tokens")
    ax.set_ylabel("count")
    ax.set_title(f"{title} (n={len(lengths)}, median {int(np.median(lengths))})")
    fig.tight_layout()
    save_figure(fig, path)
    return fig
