"""Stage results JSON: what every notebook's last cell writes and later stages read by name."""
from __future__ import annotations

import os
import platform
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from cllama import __version__
from cllama.fileio import read_json, write_json
from cllama.runtime import REPO_ROOT


def git_commit() -> str | None:
    """The repository's HEAD commit when cllama runs from a git checkout, else None."""
    root = REPO_ROOT
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def versions() -> dict:
    """python, mindspore, cllama versions and the git commit."""
    try:
        from importlib.metadata import version

        mindspore = version("mindspore")
    except Exception:  # not installed
        mindspore = None
    return {"python": platform.python_version(), "mindspore": mindspore, "cllama": __version__,
            "git_commit": git_commit()}


def write_results(output_dir: str | os.PathLike, stage: str, metrics: Mapping[str, float] | None = None,
                  artifacts: Mapping[str, str | os.PathLike] | None = None,
                  figures: Sequence[str | os.PathLike] = (), params: Mapping[str, Any] | None = None,
                  seed: int | None = None, status: str = "ok") -> Path:
    """Write `<output_dir>/results.json` (atomically) in the shape DESIGN.md fixes:
    {stage, status, metrics, artifacts, figures, params, versions, seed}. Artifacts that are None
    (not made in this run) are left out."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    doc = {
        "stage": stage,
        "status": status,
        "metrics": {k: (float(v) if v is not None else None) for k, v in (metrics or {}).items()},
        "artifacts": {k: str(v) for k, v in (artifacts or {}).items() if v is not None},
        "figures": [str(f) for f in figures],
        "params": dict(params or {}),
        "versions": versions(),
        "seed": seed,
    }
    return write_json(out / "results.json", doc)


def read_results(path: str | os.PathLike) -> dict:
    """Read a results.json (a file or the folder holding it)."""
    path = Path(path)
    return read_json(path / "results.json" if path.is_dir() else path, "stage results.json",
                     "it is written by the stage's last cell: did the stage finish?")
