"""Stage results JSON: what every notebook's last cell writes and later stages read by name."""
from __future__ import annotations

import json
import os
import platform
import subprocess
from pathlib import Path
from typing import Any, Mapping, Sequence

from cllama import __version__


def git_commit() -> str | None:
    """The repository's HEAD commit when cllama runs from a git checkout, else None."""
    root = Path(__file__).resolve().parents[1]
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
    {stage, status, metrics, artifacts, figures, params, versions, seed}."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    doc = {
        "stage": stage,
        "status": status,
        "metrics": {k: (float(v) if v is not None else None) for k, v in (metrics or {}).items()},
        "artifacts": {k: str(v) for k, v in (artifacts or {}).items()},
        "figures": [str(f) for f in figures],
        "params": dict(params or {}),
        "versions": versions(),
        "seed": seed,
    }
    path = out / "results.json"
    tmp = out / "results.json.tmp"
    tmp.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    os.replace(tmp, path)
    return path


def read_results(path: str | os.PathLike) -> dict:
    """Read a results.json (a file or the folder holding it)."""
    path = Path(path)
    if path.is_dir():
        path = path / "results.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no results.json; did the stage finish?") from None
