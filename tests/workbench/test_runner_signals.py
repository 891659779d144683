"""A runner stopped by SIGTERM or a terminal's Ctrl-C records the interrupted stage and says so in one
line (the stage's Jupyter kernel, shut down mid-cell, writes its own tracebacks to the stage's
kernel.log, not to the terminal); one killed outright reads as killed."""
import json
import os
import signal
import subprocess
import sys
import time

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_notebook

from cllama.workbench.ledger import read_ledger_rows
from tests.conftest import ROOT

PIPELINE = f"""name: sig
stages:
  - name: environment
    notebook: {ROOT}/notebooks/00_environment.ipynb
  - name: environment_again
    notebook: {ROOT}/notebooks/00_environment.ipynb
"""


def _default_sigint() -> None:  # a test runner may ignore SIGINT; a terminal's cllama would not
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _cells_done(executed) -> int:
    """Cells papermill has recorded as completed in an executed notebook (written as it runs)."""
    try:
        cells = json.loads(executed.read_text())["cells"]
    except (OSError, ValueError, KeyError):  # not there yet, or caught mid-write
        return 0
    return sum(c.get("metadata", {}).get("papermill", {}).get("status") == "completed" for c in cells)


def _start(tmp_path, kernel_running: bool = False, pipeline: str = PIPELINE, started: str = ""):
    """`cllama run` in its own session (as a terminal's foreground job), once its first stage has
    started (with kernel_running, once that stage's kernel has completed a cell: it is busy)."""
    (tmp_path / "p.yaml").write_text(pipeline)
    proc = subprocess.Popen([sys.executable, "-m", "cllama", "run", str(tmp_path / "p.yaml"), "--runs-dir",
                             str(tmp_path / "runs"), "--quiet"], cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True, preexec_fn=_default_sigint)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # the first stage has started
        logs = list((tmp_path / "runs").glob("*/run.log"))
        text = logs[0].read_text() if logs else ""
        if started and started in text:
            return proc
        if not started and "stage environment:" in text and (
                not kernel_running or _cells_done(logs[0].parent / "00_environment.ipynb")):
            return proc
        time.sleep(0.05)
    proc.kill()
    pytest.fail("the run did not start its first stage")


def _assert_interrupted(proc, tmp_path) -> None:
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    assert err.strip().splitlines() == ["cllama run: interrupted"], err[-3000:]  # no kernel or ZMQ traceback
    [row] = read_ledger_rows(tmp_path / "runs")
    assert row["status"] == "interrupted" and row["runner"] == ""
    [run] = [json.loads(p.read_text()) for p in (tmp_path / "runs").glob("*/run.json")]
    assert [(s["name"], s["status"]) for s in run["stages"]] == [("environment", "interrupted"),
                                                                 ("environment_again", "skipped")]


def test_sigterm_marks_the_running_stage_interrupted(tmp_path):
    proc = _start(tmp_path)
    proc.send_signal(signal.SIGTERM)
    _assert_interrupted(proc, tmp_path)


@pytest.mark.parametrize("how", ["ctrl-c", "sigterm", "twice"])
def test_interrupting_a_busy_kernel_prints_one_line(tmp_path, how):
    proc = _start(tmp_path, kernel_running=True)
    if how == "ctrl-c":
        os.killpg(proc.pid, signal.SIGINT)  # what a terminal sends its foreground process group
    else:
        proc.send_signal(signal.SIGTERM)
    if how == "twice":  # the second stops the runner at once, the kernel shut down by papermill
        time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGINT)
    _assert_interrupted(proc, tmp_path)
    [kernel_log] = (tmp_path / "runs").glob("*/00_environment/kernel.log")
    assert kernel_log.is_file()  # where the kernel process's own output (and its tracebacks) went
    time.sleep(2)  # a kernel that was killed is reaped
    assert not _processes_in(tmp_path)


def test_a_kernel_that_ignores_the_interrupt_is_stopped_after_the_grace_period(tmp_path):
    nb = new_notebook(metadata={"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}})
    nb.cells = [new_code_cell('output_dir = "out"  # results'),
                new_code_cell('import signal, time\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\n'
                              'print("ignoring Ctrl-C", flush=True)\ntime.sleep(300)')]
    nb.cells[0].metadata["tags"] = ["parameters"]
    nbformat.write(nb, tmp_path / "stubborn.ipynb")
    pipeline = f"name: sig\nstages:\n  - name: environment\n    notebook: {tmp_path / 'stubborn.ipynb'}\n" \
               f"  - name: environment_again\n    notebook: {tmp_path / 'stubborn.ipynb'}\n"
    proc = _start(tmp_path, pipeline=pipeline, started="ignoring Ctrl-C")
    t0 = time.monotonic()
    os.killpg(proc.pid, signal.SIGINT)
    _assert_interrupted(proc, tmp_path)
    assert time.monotonic() - t0 < 60  # the 10 s grace, then papermill's shutdown (5 s), not the cell's 300 s
    assert not _processes_in(tmp_path)  # the kernel is gone too


def _processes_in(folder) -> list[str]:
    """Live processes whose working folder is `folder` (a stage's kernel runs in the runner's)."""
    found = []
    for proc in os.listdir("/proc"):
        try:
            if proc.isdigit() and os.readlink(f"/proc/{proc}/cwd") == str(folder):
                found.append(open(f"/proc/{proc}/cmdline").read().replace("\0", " "))
        except OSError:  # gone meanwhile, or not ours to look at
            continue
    return found


def test_a_runner_killed_outright_reads_as_killed(tmp_path):
    proc = _start(tmp_path)
    [row] = read_ledger_rows(tmp_path / "runs")
    assert row["status"] == "running" and row["runner"].endswith(f":{proc.pid}")
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    [row] = read_ledger_rows(tmp_path / "runs")
    assert row["status"] == "killed"
