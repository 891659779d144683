"""A runner stopped by SIGTERM records the interrupted stage; one killed outright reads as killed."""
import json
import signal
import subprocess
import sys
import time

import pytest

from cllama.workbench.ledger import read_ledger_rows
from tests.conftest import ROOT

PIPELINE = f"""name: sig
stages:
  - name: environment
    notebook: {ROOT}/notebooks/00_environment.ipynb
  - name: environment_again
    notebook: {ROOT}/notebooks/00_environment.ipynb
"""


def _start(tmp_path):
    (tmp_path / "p.yaml").write_text(PIPELINE)
    proc = subprocess.Popen([sys.executable, "-m", "cllama", "run", str(tmp_path / "p.yaml"), "--runs-dir",
                             str(tmp_path / "runs"), "--quiet"], cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # the first stage has started
        logs = list((tmp_path / "runs").glob("*/run.log"))
        if logs and "stage environment:" in logs[0].read_text():
            return proc
        time.sleep(0.05)
    proc.kill()
    pytest.fail("the run did not start its first stage")


def test_sigterm_marks_the_running_stage_interrupted(tmp_path):
    proc = _start(tmp_path)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "cllama run: interrupted" in err, err[-3000:]
    [row] = read_ledger_rows(tmp_path / "runs")
    assert row["status"] == "interrupted" and row["runner"] == ""
    [run] = [json.loads(p.read_text()) for p in (tmp_path / "runs").glob("*/run.json")]
    assert [(s["name"], s["status"]) for s in run["stages"]] == [("environment", "interrupted"),
                                                                 ("environment_again", "skipped")]


def test_a_runner_killed_outright_reads_as_killed(tmp_path):
    proc = _start(tmp_path)
    [row] = read_ledger_rows(tmp_path / "runs")
    assert row["status"] == "running" and row["runner"].endswith(f":{proc.pid}")
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    [row] = read_ledger_rows(tmp_path / "runs")
    assert row["status"] == "killed"
