"""The run ledger `<runs_dir>/index.csv`: one row per `cllama run` (name, start, duration, status,
key parameters and metrics), and reading runs back for comparison (notebooks/09_compare_runs).

The ledger is UTF-8 CSV with a header. Reading takes a ledger of an older version (columns missing:
read as empty) and keeps columns it does not know (they are written back); a file that is not such
a CSV (another encoding, a row longer than the header, no run_id column) is refused with one error
and never rewritten: a runner refuses to start rather than replace it."""
from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional

from cllama.fileio import atomic_path, pid_alive
from cllama.workbench.results import read_results

LEDGER_FIELDS = ["run_id", "name", "status", "start", "duration_s", "failed_stage", "stages", "final_loss",
                 "val_loss", "pass@1", "train_tokens_per_s", "generate_tokens_per_s", "params", "metrics",
                 "run_dir", "runner"]
TRAIN_STAGES = ("pretrain", "finetune")
EVAL_STAGES = ("evaluate_humaneval", "evaluate_mbpp")


def key_metrics(stage_results: list[dict]) -> dict[str, Any]:
    """Headline figures of a run from its stages' results.json: the last training stage's loss and
    tokens/s, HumanEval pass@1, generation speed, and every evaluation's pass@k under its protocol
    (columns like `pass@1 humaneval/unstripped/greedy`, `pass@1 mbpp/greedy`)."""
    out: dict[str, Any] = {}
    for results in stage_results:
        kind, metrics = results.get("stage"), results.get("metrics") or {}
        if kind in TRAIN_STAGES:
            out.update(final_loss=metrics.get("final_loss"), val_loss=metrics.get("val_loss"),
                       train_tokens_per_s=metrics.get("tokens_per_s"))
        elif kind in EVAL_STAGES:
            protocol = (results.get("params") or {}).get("protocol") or kind
            out.update({f"{k} {protocol}": v for k, v in metrics.items() if k.startswith("pass@")})
            if kind == "evaluate_humaneval":
                out["pass@1"] = metrics.get("pass@1")
        elif kind == "generate":
            out["generate_tokens_per_s"] = metrics.get("tokens_per_s")
    return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in out.items() if v is not None}


def update_ledger(runs_dir: str | os.PathLike, row: Mapping[str, Any]) -> Path:
    """Insert or replace (by run_id) one row of <runs_dir>/index.csv, rewriting it atomically under a lock."""
    import fcntl

    runs_dir = Path(runs_dir)
    runs_dir.mkdir(parents=True, exist_ok=True)
    path = runs_dir / "index.csv"
    with open(runs_dir / ".index.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        rows = read_ledger_rows(path)
        ids = [r.get("run_id") for r in rows]
        if row["run_id"] in ids:  # a finished run updates the row it wrote when it started
            rows[ids.index(row["run_id"])] = dict(row)
        else:
            rows.append(dict(row))
        fields = LEDGER_FIELDS + sorted({k for r in rows for k in r} - set(LEDGER_FIELDS))
        with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            writer.writerows(rows)
    return path


def read_ledger_rows(path: str | os.PathLike) -> list[dict]:
    """The rows of index.csv (`path` or a runs folder holding it), every LEDGER_FIELDS column present
    (empty when an older ledger lacks it); a `running` row whose runner (host:pid) is this host's and
    no longer alive reads as `killed`. A file that is not a cllama ledger is a ValueError."""
    path = Path(path)
    if path.is_dir():
        path = path / "index.csv"
    if not path.is_file():
        return []
    rows = _parse_ledger(path)
    for row in rows:
        if row.get("status") == "running" and _runner_gone(row.get("runner") or ""):
            row["status"] = "killed"
    return rows


def _parse_ledger(path: Path) -> list[dict]:
    def refuse(reason: str) -> ValueError:
        return ValueError(f"{path}: not a cllama ledger ({reason}); move it aside (a new one is started) or fix it")

    data = path.read_bytes()
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise refuse("UTF-16 text; save it as UTF-8")
    if b"\x00" in data:
        raise refuse("NUL bytes: binary data, or UTF-16 text without a byte order mark")
    try:
        text = data.decode("utf-8-sig")  # a spreadsheet's byte order mark is fine
    except UnicodeDecodeError as err:
        line = data[:err.start].count(b"\n") + 1
        raise refuse(f"not UTF-8: byte {data[err.start]:#04x} on line {line}; save it as UTF-8") from None
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader, [])
        if not any(header):
            if text.strip():
                raise refuse("its first line is empty; the first line is the header, starting with run_id")
            return []
        if "run_id" not in header:
            raise refuse(f"the first line has no run_id column: {', '.join(header)[:80]!r}")
        if len(set(header)) != len(header):
            raise refuse(f"columns named twice: {sorted({c for c in header if header.count(c) > 1})}")
        rows = []
        for values in reader:
            if not values:
                continue
            if len(values) > len(header):
                raise refuse(f"line {reader.line_num} has {len(values)} fields, the header {len(header)}")
            rows.append({**dict.fromkeys(LEDGER_FIELDS, ""), **dict(zip(header, values)),
                         **dict.fromkeys(header[len(values):], "")})
    except csv.Error as err:
        raise refuse(f"CSV error on line {reader.line_num}: {err}") from None
    return rows


def _runner_gone(runner: str) -> bool:
    import socket

    host, _, pid = runner.rpartition(":")
    return host == socket.gethostname() and pid.isdigit() and not pid_alive(int(pid))


def read_ledger(runs_dir: str | os.PathLike = "papermill_runs"):
    """The run ledger as a pandas DataFrame (one row per run, oldest first)."""
    import pandas as pd

    rows = read_ledger_rows(runs_dir)
    frame = pd.DataFrame(rows, columns=LEDGER_FIELDS if not rows else None)
    for column in ("duration_s", "final_loss", "val_loss", "pass@1", "train_tokens_per_s", "generate_tokens_per_s"):
        if column in frame:
            frame[column] = pd.to_numeric(frame[column], errors="coerce")
    return frame


def stage_results(run_dir: str | os.PathLike) -> dict[str, dict]:
    """results.json of each finished stage of a run folder (also mid-run): {stage name: results}."""
    out = {}
    for path in sorted(Path(run_dir).glob("[0-9][0-9]_*/results.json")):
        out[path.parent.name.split("_", 1)[1]] = read_results(path)
    return out


def loss_records(run_dir: str | os.PathLike) -> dict[str, list[dict]]:
    """Per-step training records of every training stage of a run: {stage name: metrics.jsonl records}."""
    from cllama.train.metrics import read_metrics

    if not Path(run_dir).is_dir():
        raise FileNotFoundError(f"{run_dir}: no such run folder")
    return {name: read_metrics(results["artifacts"]["metrics"]) for name, results in stage_results(run_dir).items()
            if results.get("stage") in TRAIN_STAGES and results.get("artifacts", {}).get("metrics")}


def loss_curves(chosen) -> dict[str, list[dict]]:
    """{"<run id> / <stage>": metrics records} of every training stage of the chosen ledger rows."""
    return {f"{row['run_id']} / {stage}": records for row in chosen.to_dict("records")
            for stage, records in loss_records(row["run_dir"]).items()}


def metrics_table(chosen):
    """Every stage metric (rows) of the chosen ledger rows (columns, by run id), as a DataFrame."""
    import pandas as pd

    return pd.DataFrame({row["run_id"]: json.loads(row["metrics"] or "{}") for row in chosen.to_dict("records")})


def select_runs(runs_dir: str | os.PathLike, runs: list[str] | None = None, last: int = 5,
                status: Optional[str] = "ok"):
    """Ledger rows of the chosen runs: by run id (or unique prefix/name) when given, else the `last`
    newest runs with `status` (None: any)."""
    frame = read_ledger(runs_dir)
    if runs:
        picked = []
        for key in runs:
            hits = frame[(frame["run_id"] == key) | frame["run_id"].str.startswith(key) | (frame["name"] == key)]
            if hits.empty:
                raise ValueError(f"{Path(runs_dir) / 'index.csv'}: no run matches {key!r}; runs: "
                                 f"{list(frame['run_id'])[-10:]}")
            picked.append(hits.iloc[[-1]])
        import pandas as pd

        return pd.concat(picked).drop_duplicates("run_id")
    if status:
        frame = frame[frame["status"] == status]
    return frame.tail(last)


def evaluation_flips(chosen):
    """Tasks that flipped (pass -> fail and back) between the first two chosen runs, for every
    evaluation stage both have, with both completions side by side (notebook 09), as a DataFrame."""
    import pandas as pd

    from cllama.evaluation.interchange import flipped_tasks

    columns = ["stage", "task_id", "change", "result_a", "result_b", "completion_a", "completion_b"]
    rows = chosen.to_dict("records")[:2]
    if len(rows) < 2:
        return pd.DataFrame(columns=columns)
    a, b = (stage_results(r["run_dir"]) for r in rows)
    flips = [{"stage": name, **flip} for name, results in a.items()
             if results.get("stage") in EVAL_STAGES and name in b
             for flip in flipped_tasks(results["artifacts"]["results"], b[name]["artifacts"]["results"])]
    return pd.DataFrame(flips, columns=columns)
