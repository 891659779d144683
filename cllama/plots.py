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
