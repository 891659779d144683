"""The per-step metrics log (`metrics.jsonl`), written as training goes and read back; pure Python."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

from cllama.fileio import atomic_write, dumps


class MetricsLog:
    """Per-step records appended to a JSONL file and flushed as they come. Opening with
    `after_step=N` first drops records past step N (a resumed run rewrites them). Lines are strict
    JSON: a non-finite float (NaN, inf) is written as null, never as a bare NaN token."""

    def __init__(self, path: str | os.PathLike, after_step: Optional[int] = None) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if after_step is not None and self.path.exists():
            kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= after_step]
            atomic_write(self.path, "".join(dumps(r, indent=None) + "\n" for r in kept))
        elif after_step is None and self.path.exists():
            self.path.unlink()
        self.file = open(self.path, "a")

    def write(self, record: dict) -> None:
        self.file.write(dumps(record, indent=None) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """Records of a metrics.jsonl (a file or its run directory); a torn last line is skipped."""
    path = Path(path)
    if path.is_dir():
        path = path / "metrics.jsonl"
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records

