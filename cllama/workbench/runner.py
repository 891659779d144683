"""Running a pipeline: stage notebooks executed with papermill in a run folder, stage outputs
passed on by name, and a row in the run ledger.

A run folder `<runs_dir>/<YYYYmmdd-HHMMSS>-<name>/` holds NN_<stage>.ipynb (executed), NN_<stage>/
(results.json, figures, artifacts), pipeline.yaml, params.json (resolved), run.log and run.json.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Optional

import yaml

from cllama.fileio import dumps, write_json
from cllama.workbench.ledger import key_metrics, update_ledger
from cllama.workbench.pipeline import Pipeline, Stage, quiet_papermill, resolve
from cllama.workbench.results import read_results


@dataclass
class StageRun:
    name: str
    notebook: str
    executed: str
    output_dir: str
    status: str = "pending"  # pending | ok | failed | interrupted | skipped
    seconds: float = 0.0
    results: dict = field(default_factory=dict)
    error: str = ""


@dataclass
class RunResult:
    run_id: str
    run_dir: Path
    status: str  # running | ok | failed | interrupted (a runner that died: "killed" in the ledger)
    stages: list[StageRun]
    seconds: float

    @property
    def failed_stage(self) -> Optional[StageRun]:
        return next((s for s in self.stages if s.status == "failed"), None)

    def results(self, stage: str) -> dict:
        """results.json of a finished stage, by stage name."""
        for s in self.stages:
            if s.name == stage:
                return s.results
        raise KeyError(f"run {self.run_id} has no stage {stage!r}")


# ---- running --------------------------------------------------------------------------------------------
def _new_run_dir(runs_dir: Path, name: str, start: datetime) -> Path:
    base = f"{start:%Y%m%d-%H%M%S}-{name}"
    for i in range(1, 1000):
        run_dir = runs_dir / (base if i == 1 else f"{base}-{i}")
        try:
            run_dir.mkdir(parents=True)
            return run_dir
        except FileExistsError:
            continue
    raise FileExistsError(f"{runs_dir}: could not create a run folder for {base}")


def ledger_row(result: RunResult, pipeline: Pipeline, start: datetime) -> dict[str, Any]:
    """The run's row of the ledger (index.csv)."""
    failed = result.failed_stage
    metrics = {f"{s.name}.{k}": v for s in result.stages for k, v in (s.results.get("metrics") or {}).items()}
    return {"run_id": result.run_id, "name": pipeline.name, "status": result.status,
            "runner": f"{socket.gethostname()}:{os.getpid()}" if result.status == "running" else "",
            "start": start.isoformat(timespec="seconds"), "duration_s": round(result.seconds, 1),
            "failed_stage": failed.name if failed else "", "stages": " ".join(s.name for s in pipeline.stages),
            **key_metrics([s.results for s in result.stages]),
            "params": dumps({s.name: s.params for s in pipeline.stages if s.params}, indent=None),
            "metrics": dumps(metrics, indent=None), "run_dir": str(result.run_dir)}


def _error_text(err: BaseException) -> str:
    ename, evalue = getattr(err, "ename", None), getattr(err, "evalue", None)
    return f"{ename}: {evalue}" if ename else f"{type(err).__name__}: {err}"


def _execute(stage: Stage, record: StageRun, params: dict, log, cwd, kernel_name: Optional[str],
             progress: bool) -> None:
    """Run one stage notebook with papermill; record its results.json, or the error."""
    import papermill

    try:
        with quiet_papermill():
            papermill.execute_notebook(str(stage.notebook), record.executed, parameters=params,
                                       cwd=str(cwd or os.getcwd()), kernel_name=kernel_name, progress_bar=progress,
                                       stdout_file=log, stderr_file=log)
        results_file = Path(record.output_dir) / "results.json"
        if not results_file.is_file():
            raise RuntimeError(f"{stage.notebook.name} finished without writing {results_file}")
        record.results = read_results(results_file)
        if record.results.get("status", "ok") != "ok":
            raise RuntimeError(f"results.json says status {record.results.get('status')!r}")
        record.status = "ok"
    except Exception as err:  # papermill's error carries the cell's exception name and value
        record.status, record.error = "failed", _error_text(err)


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def run_pipeline(pipeline: Pipeline, runs_dir: str | os.PathLike = "papermill_runs",
                 cwd: str | os.PathLike | None = None, progress: bool = True,
                 kernel_name: Optional[str] = None) -> RunResult:
    """Execute the stages in order in a new run folder; stop at the first failing stage (its executed
    notebook keeps the error). The ledger row is written at the start (status running, with this
    runner's host:pid, so a runner killed outright shows as `killed` when the ledger is next read) and
    at the end. Ctrl-C or SIGTERM stops the run: the stage that was running is `interrupted`, the rest
    `skipped`, the run `interrupted`, and KeyboardInterrupt propagates (the CLI says so in one line)."""
    runs_dir = Path(runs_dir).resolve()
    start = datetime.now()
    run_dir = _new_run_dir(runs_dir, pipeline.name, start)
    run_id = run_dir.name
    (run_dir / "pipeline.yaml").write_text(yaml.safe_dump(pipeline.to_dict(), sort_keys=False))
    stages = [StageRun(s.name, str(s.notebook), str(run_dir / f"{i:02d}_{s.name}.ipynb"),
                       str(run_dir / f"{i:02d}_{s.name}")) for i, s in enumerate(pipeline.stages)]
    result = RunResult(run_id, run_dir, "running", stages, 0.0)
    started = time.monotonic()
    done: dict[str, dict] = {}
    resolved: dict[str, dict] = {}
    update_ledger(runs_dir, ledger_row(result, pipeline, start))
    say = print if progress else (lambda *a, **k: None)
    previous = None
    if threading.current_thread() is threading.main_thread():  # SIGTERM stops the run like Ctrl-C
        previous = signal.signal(signal.SIGTERM, _interrupt)
    say(f"run {run_id}: {len(stages)} stages -> {run_dir}")
    with open(run_dir / "run.log", "a", buffering=1) as log:
        def note(text: str) -> None:
            log.write(f"[{datetime.now():%H:%M:%S}] {text}\n")

        try:
            for i, (stage, record) in enumerate(zip(pipeline.stages, stages)):
                say(f"[{i + 1}/{len(stages)}] {stage.name} ({stage.notebook.name})", flush=True)
                t0 = time.monotonic()
                try:
                    params = {k: resolve(v, done, run_dir) for k, v in stage.params.items()}
                except ValueError as err:
                    record.status, record.error = "failed", f"stage {stage.name!r}: {err}"
                    note(record.error)
                    say(f"    failed: {record.error}")
                    break
                params["output_dir"] = record.output_dir
                resolved[stage.name] = params
                write_json(run_dir / "params.json", resolved)
                note(f"stage {stage.name}: {stage.notebook} -> {record.executed}\n"
                     f"  params {json.dumps(params, default=str)}")
                _execute(stage, record, params, log, cwd, kernel_name, progress)
                record.seconds = time.monotonic() - t0
                if record.status == "failed":
                    note(f"stage {stage.name} FAILED after {record.seconds:.1f} s: {record.error}")
                    say(f"    FAILED after {record.seconds:.1f} s: {record.error}\n    see {record.executed}")
                    break
                done[stage.name] = record.results
                headline = ", ".join(f"{k} {v:.4g}" for k, v in list(record.results.get("metrics", {}).items())[:4]
                                     if isinstance(v, (int, float)))
                note(f"stage {stage.name} ok in {record.seconds:.1f} s")
                say(f"    ok in {record.seconds:.1f} s" + (f": {headline}" if headline else ""))
            result.status = "failed" if any(s.status == "failed" for s in stages) else "ok"
        except KeyboardInterrupt:
            if previous is not None:  # stopping: a second Ctrl-C (or the kernel's interrupt reaching this
                signal.signal(signal.SIGINT, signal.SIG_IGN)  # process group) must not cut the records short
            result.status = "interrupted"
            current = next((r for r in stages if r.status == "pending"), None)
            if current is not None:
                current.status, current.error = "interrupted", "interrupted (Ctrl-C or SIGTERM)"
            note(f"interrupted{f' during stage {current.name}' if current else ''}")
            raise
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
            for record in stages:
                if record.status == "pending":
                    record.status = "skipped"
            result.seconds = time.monotonic() - started
            note(f"run {result.status} in {result.seconds:.1f} s")
            write_json(run_dir / "run.json", {"run_id": run_id, "name": pipeline.name, "pipeline": pipeline.source,
                                               "status": result.status, "start": start.isoformat(timespec="seconds"),
                                               "seconds": round(result.seconds, 1),
                                               "stages": [s.__dict__ for s in stages]})
            update_ledger(runs_dir, ledger_row(result, pipeline, start))
    say(f"run {run_id}: {result.status} in {result.seconds:.1f} s; ledger {runs_dir / 'index.csv'}")
    return result
