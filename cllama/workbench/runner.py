"""Running a pipeline: stage notebooks executed with papermill in a run folder, stage outputs
passed on by name, and a row in the run ledger.

A run folder `<runs_dir>/<YYYYmmdd-HHMMSS>-<name>/` holds NN_<stage>.ipynb (executed), NN_<stage>/
(results.json, figures, artifacts, and kernel.log: what the stage's Jupyter kernel process itself
printed, e.g. MindSpore's C++ logs, or a kernel stopped by Ctrl-C), pipeline.yaml, params.json
(resolved), run.log (the cells' printed output) and run.json.
"""
from __future__ import annotations

import contextlib
import gc
import json
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Optional

import yaml

from cllama.fileio import dumps, write_json
from cllama.workbench.ledger import key_metrics, read_ledger_rows, update_ledger
from cllama.workbench.pipeline import Pipeline, Stage, resolve
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


def logged_kernel_manager(log_path: Path, on_launch=None):
    """A Jupyter kernel manager class whose kernels write their process's stdout and stderr to
    `log_path` (appended) instead of this terminal (MindSpore's C++ logs, ipykernel's warnings, the
    tracebacks of a kernel stopped mid-cell), and which calls `on_launch(pid, process group)` once
    the kernel process exists. jupyter_client starts each kernel in its own session: a terminal's
    Ctrl-C reaches the runner only, which interrupts the kernel itself (`_Stop`)."""
    from jupyter_client import AsyncKernelManager

    class LoggedKernelManager(AsyncKernelManager):
        async def _async_launch_kernel(self, kernel_cmd, **kw):
            Path(log_path).parent.mkdir(parents=True, exist_ok=True)
            with open(log_path, "ab") as f:  # the kernel process keeps its own copy of the descriptor
                await super()._async_launch_kernel(kernel_cmd, **{**kw, "stdout": f, "stderr": f})
            pid = getattr(self.provisioner, "pid", None)
            if on_launch is not None and pid:
                on_launch(pid, getattr(self.provisioner, "pgid", None))

    return LoggedKernelManager


class _Stop:
    """Ctrl-C and SIGTERM during a run. The first, while a stage's kernel runs, interrupts the kernel
    (SIGINT to its process group, as Ctrl-C in JupyterLab): the cell stops with KeyboardInterrupt,
    papermill saves the notebook and shuts the kernel down as after any error, and the runner stops.
    A signal between two cells stops the stage before the next (`before_cell`). A second signal, one
    while no kernel runs, or a kernel still running GRACE s later stop the runner at once
    (KeyboardInterrupt where it is; papermill then shuts the kernel down)."""
    GRACE = 10.0
    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGALRM)

    def __init__(self) -> None:
        self.requested = False
        self.kernel: Optional[tuple[int, Optional[int]]] = None  # the running kernel's pid and process group
        self.previous: dict = {}

    def __call__(self, signum, frame) -> None:
        if self.requested or self.kernel is None:
            raise KeyboardInterrupt(f"signal {signum}")
        self.requested = True
        pid, group = self.kernel
        try:
            if group and group != os.getpgrp():  # its own group: its msrun or sandbox workers stop too
                os.killpg(group, signal.SIGINT)
            else:
                os.kill(pid, signal.SIGINT)
        except OSError:  # the kernel is gone already
            raise KeyboardInterrupt(f"signal {signum}") from None
        signal.setitimer(signal.ITIMER_REAL, self.GRACE)  # SIGALRM: the second signal

    def before_cell(self, **_) -> None:
        """nbclient's on_cell_start hook: an idle kernel ignores SIGINT, so a signal that came between
        two cells stops the stage here."""
        if self.requested:
            from nbclient.exceptions import CellExecutionError

            raise CellExecutionError("", "KeyboardInterrupt", "stopped before this cell (Ctrl-C or SIGTERM)")

    def install(self) -> None:
        if threading.current_thread() is threading.main_thread():  # signals reach the main thread only
            self.previous = {s: signal.signal(s, self) for s in self.SIGNALS}

    def stopping(self) -> None:
        """Records are being written: no timer, and a further Ctrl-C must not cut them short."""
        if self.previous:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)

    def restore(self) -> None:
        if self.previous:
            signal.setitimer(signal.ITIMER_REAL, 0)
            for s, handler in self.previous.items():
                signal.signal(s, signal.SIG_DFL if handler is None else handler)


@contextlib.contextmanager
def _logs_to(log) -> Iterator[None]:
    """papermill's, nbclient's, jupyter_client's and asyncio's warnings go to run.log, not the terminal
    (e.g. "Kernel died" after an interrupt)."""
    import logging

    handler = logging.StreamHandler(log)
    handler.setFormatter(logging.Formatter("[%(asctime)s] %(name)s %(levelname)s: %(message)s", "%H:%M:%S"))
    loggers = [logging.getLogger(name) for name in ("papermill", "traitlets", "asyncio")]
    saved = [(lg.propagate, lg.level) for lg in loggers]
    for lg in loggers:
        lg.addHandler(handler)
        lg.propagate = False
        lg.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for lg, (propagate, level) in zip(loggers, saved):
            lg.removeHandler(handler)
            lg.propagate, lg.level = propagate, level


def _execute(stage: Stage, record: StageRun, params: dict, log, cwd, kernel_name: Optional[str],
             progress: bool, stop: _Stop) -> None:
    """Run one stage notebook with papermill; record its results.json, or the error."""
    import papermill

    def launched(pid: int, group: Optional[int]) -> None:
        stop.kernel = (pid, group)

    try:
        manager = logged_kernel_manager(Path(record.output_dir) / "kernel.log", launched)
        papermill.execute_notebook(str(stage.notebook), record.executed, parameters=params,
                                   cwd=str(cwd or os.getcwd()), kernel_name=kernel_name, progress_bar=progress,
                                   stdout_file=log, stderr_file=log, kernel_manager_class=manager,
                                   on_cell_start=stop.before_cell)
        results_file = Path(record.output_dir) / "results.json"
        if not results_file.is_file():
            raise RuntimeError(f"{stage.notebook.name} finished without writing {results_file}")
        record.results = read_results(results_file)
        if record.results.get("status", "ok") != "ok":
            raise RuntimeError(f"results.json says status {record.results.get('status')!r}")
        record.status = "ok"
    except Exception as err:  # papermill's error carries the cell's exception name and value
        record.status, record.error = "failed", _error_text(err)
    finally:
        stop.kernel = None


def run_pipeline(pipeline: Pipeline, runs_dir: str | os.PathLike = "papermill_runs",
                 cwd: str | os.PathLike | None = None, progress: bool = True,
                 kernel_name: Optional[str] = None) -> RunResult:
    """Execute the stages in order in a new run folder; stop at the first failing stage (its executed
    notebook keeps the error). The ledger row is written at the start (status running, with this
    runner's host:pid, so a runner killed outright shows as `killed` when the ledger is next read) and
    at the end; a ledger that is not a cllama ledger stops the run before it starts (ValueError).
    Ctrl-C or SIGTERM stops the run (`_Stop`): the stage that was running is `interrupted` (its
    executed notebook shows where), the rest `skipped`, the run `interrupted`, and KeyboardInterrupt
    propagates (the CLI says so in one line)."""
    runs_dir = Path(runs_dir).resolve()
    read_ledger_rows(runs_dir)  # a damaged ledger stops the run before anything is made (and stays as it is)
    start = datetime.now()
    run_dir = _new_run_dir(runs_dir, pipeline.name, start)
    run_id = run_dir.name
    (run_dir / "pipeline.yaml").write_text(yaml.safe_dump(pipeline.to_dict(), sort_keys=False))
    stages = [StageRun(s.name, str(s.notebook), str(run_dir / f"{i:02d}_{s.name}.ipynb"),
                       str(run_dir / f"{i:02d}_{s.name}")) for i, s in enumerate(pipeline.stages)]
    result = RunResult(run_id, run_dir, "running", stages, 0.0)
    started = time.monotonic()
    update_ledger(runs_dir, ledger_row(result, pipeline, start))
    say = print if progress else (lambda *a, **k: None)
    stop = _Stop()
    stop.install()
    say(f"run {run_id}: {len(stages)} stages -> {run_dir}")
    try:
        with open(run_dir / "run.log", "a", buffering=1) as log, _logs_to(log):
            def note(text: str) -> None:
                log.write(f"[{datetime.now():%H:%M:%S}] {text}\n")

            try:
                result.status = _run_stages(pipeline, stages, run_dir, log, note, say, stop, cwd, kernel_name,
                                            progress)
            except KeyboardInterrupt:
                stop.stopping()
                result.status = "interrupted"
                current = next((r for r in stages if r.status != "ok"), None)  # the one running or starting
                if current is not None:
                    current.status, current.error = "interrupted", "interrupted (Ctrl-C or SIGTERM)"
                note(f"interrupted{f' during stage {current.name}' if current else ''}")
            finally:
                stop.stopping()
                for record in stages:
                    if record.status == "pending":
                        record.status = "skipped"
                result.seconds = time.monotonic() - started
                note(f"run {result.status} in {result.seconds:.1f} s")
                write_json(run_dir / "run.json", {
                    "run_id": run_id, "name": pipeline.name, "pipeline": pipeline.source, "status": result.status,
                    "start": start.isoformat(timespec="seconds"), "seconds": round(result.seconds, 1),
                    "stages": [s.__dict__ for s in stages]})
                try:
                    update_ledger(runs_dir, ledger_row(result, pipeline, start))
                except ValueError as err:  # the ledger was damaged during the run: it stays as it is
                    note(f"ledger not updated: {err}")
                    print(f"cllama: run {run_id} ({result.status}): ledger not updated: {err}; run.json in "
                          f"{run_dir} has the run", file=sys.stderr)
            gc.collect()  # an interrupted papermill's leftover tasks log here, into run.log
    finally:
        stop.restore()
    if result.status == "interrupted":
        raise KeyboardInterrupt(f"run {run_id} interrupted")
    say(f"run {run_id}: {result.status} in {result.seconds:.1f} s; ledger {runs_dir / 'index.csv'}")
    return result


def _run_stages(pipeline: Pipeline, stages: list[StageRun], run_dir: Path, log, note, say, stop: _Stop, cwd,
                kernel_name: Optional[str], progress: bool) -> str:
    """The stages in order until one fails; returns the run's status (ok or failed)."""
    done: dict[str, dict] = {}
    resolved: dict[str, dict] = {}
    for i, (stage, record) in enumerate(zip(pipeline.stages, stages)):
        say(f"[{i + 1}/{len(stages)}] {stage.name} ({stage.notebook.name})", flush=True)
        t0 = time.monotonic()
        try:
            params = {k: resolve(v, done, run_dir) for k, v in stage.params.items()}
        except ValueError as err:
            record.status, record.error = "failed", f"stage {stage.name!r}: {err}"
            note(record.error)
            say(f"    failed: {record.error}")
            return "failed"
        params["output_dir"] = record.output_dir
        resolved[stage.name] = params
        write_json(run_dir / "params.json", resolved)
        note(f"stage {stage.name}: {stage.notebook} -> {record.executed}\n"
             f"  params {json.dumps(params, default=str)}\n"
             f"  the kernel process's own output: {Path(record.output_dir) / 'kernel.log'}")
        _execute(stage, record, params, log, cwd, kernel_name, progress, stop)
        record.seconds = time.monotonic() - t0
        if stop.requested:  # the kernel was interrupted: its KeyboardInterrupt is not the stage failing
            if record.status == "failed":
                record.status = "interrupted"
            raise KeyboardInterrupt("stopped")
        if record.status == "failed":
            note(f"stage {stage.name} FAILED after {record.seconds:.1f} s: {record.error}")
            say(f"    FAILED after {record.seconds:.1f} s: {record.error}\n    see {record.executed}")
            return "failed"
        done[stage.name] = record.results
        headline = ", ".join(f"{k} {v:.4g}" for k, v in list(record.results.get("metrics", {}).items())[:4]
                             if isinstance(v, (int, float)))
        note(f"stage {stage.name} ok in {record.seconds:.1f} s")
        say(f"    ok in {record.seconds:.1f} s" + (f": {headline}" if headline else ""))
    return "ok"
