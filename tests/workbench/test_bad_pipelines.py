"""Bad input to `cllama run` / `cllama runs` is one line naming the file, the field and the fix (exit 2):
stage notebooks that are not notebooks, damaged ledgers (never rewritten), and ${stage.kind.NAME}
references to names the producing notebook does not write (read from its source with ast)."""
import csv
import json
import re
from pathlib import Path

import nbformat
import pytest
import yaml
from nbformat.v4 import new_code_cell, new_notebook

from cllama.cli import main
from cllama.workbench import ledger
from cllama.workbench import pipeline as runs
from tests.conftest import ROOT

PIPELINES = sorted((ROOT / "configs" / "pipelines").glob("*.yaml"))


def _notebook(path: Path, parameters: str, body: str, tagged: bool = True) -> Path:
    nb = new_notebook(metadata={"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}})
    cell = new_code_cell(parameters)
    if tagged:
        cell.metadata["tags"] = ["parameters"]
    nb.cells = [new_code_cell("from cllama.workbench.results import write_results"), cell, new_code_cell(body)]
    nbformat.write(nb, path)
    return path


def _pipeline(tmp_path: Path, stages: list, name: str = "bad") -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"name": name, "stages": stages}))
    return path


def _one_line_error(capsys, code: int) -> str:
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    return err.strip()


@pytest.fixture
def producer(tmp_path) -> Path:
    return _notebook(tmp_path / "produce.ipynb", 'size = 1  # a number\noutput_dir = "out"  # results go here',
                     'write_results(output_dir, stage="produce", metrics={"loss": 0.5, "tokens_per_s": 10.0},\n'
                     '              artifacts={"checkpoint": output_dir, "metrics": output_dir},\n'
                     '              params={"size": size})')


# ---- 1. stage notebooks that are not notebooks ---------------------------------------------------------------
NOT_NOTEBOOKS = {
    "empty": (b"", r"is not a Jupyter notebook \(the file is empty\)"),
    "text": (b"print('hello')\n", r"is not a Jupyter notebook \(JSON error at line 1: Expecting value\)"),
    "broken_json": (b'{\n  "cells": [\n  oops\n}', r"is not a Jupyter notebook \(JSON error at line 3: "),
    "list": (b"[1, 2]", r"is not a Jupyter notebook \(its JSON is list, not an object"),
    "utf16": ('{"cells": []}'.encode("utf-16"), r"is not a Jupyter notebook \(not UTF-8 text"),
    "no_cells": (b'{"nbformat": 4, "metadata": {}}', r"is not a Jupyter notebook \(no list of cells"),
    "nbformat3": (b'{"nbformat": 3, "worksheets": []}', r"is not an nbformat 4 Jupyter notebook"),
}


@pytest.mark.parametrize("kind", NOT_NOTEBOOKS)
@pytest.mark.parametrize("check", [True, False], ids=["check", "run"])
def test_a_stage_notebook_that_is_not_a_notebook(tmp_path, capsys, kind, check):
    content, message = NOT_NOTEBOOKS[kind]
    (tmp_path / "stage.ipynb").write_bytes(content)
    path = _pipeline(tmp_path, [{"name": "train", "notebook": str(tmp_path / "stage.ipynb")}])
    code = main(["run", str(path), "--runs-dir", str(tmp_path / "runs"), "--quiet"] + (["--check"] if check else []))
    err = _one_line_error(capsys, code)
    assert err.startswith(f"cllama run: error: {path}: stage 'train': notebook {tmp_path / 'stage.ipynb'} "), err
    assert re.search(message, err), err
    assert not (tmp_path / "runs").exists()  # nothing started


def test_a_missing_notebook_or_one_without_parameters_cell(tmp_path, capsys):
    path = _pipeline(tmp_path, [{"name": "train", "notebook": "nowhere/03_train.ipynb"}])
    err = _one_line_error(capsys, main(["run", str(path), "--check"]))
    assert f"{path}: stage 'train': notebook nowhere/03_train.ipynb not found" in err
    _notebook(tmp_path / "untagged.ipynb", 'output_dir = "out"  # results', "print(output_dir)", tagged=False)
    path = _pipeline(tmp_path, [{"name": "train", "notebook": str(tmp_path / "untagged.ipynb")}])
    err = _one_line_error(capsys, main(["run", str(path), "--check"]))
    assert f"stage 'train': notebook {tmp_path / 'untagged.ipynb'} has no cell tagged 'parameters'" in err
    assert "add \"tags\": [\"parameters\"]" in err
    path = _pipeline(tmp_path, [{"name": "train", "notebook": 3}])
    err = _one_line_error(capsys, main(["run", str(path), "--check"]))
    assert "stages[0]: notebook must be the path of an .ipynb file (got 3)" in err


# ---- 2. damaged ledgers ---------------------------------------------------------------------------------------
GOOD_ROW = {"run_id": "20240101-000000-demo", "name": "demo", "status": "ok", "start": "2024-01-01T00:00:00",
            "duration_s": "12.5", "final_loss": "2.5"}
DAMAGED = {
    "utf16": "run_id,name,status\n20240101-000000-démo,démo,ok\n".encode("utf-16"),
    "latin1": "run_id,name,status\n20240101-000000-demo,d\xe9mo,ok\n".encode("latin-1"),
    "garbage": b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR",
    "not_a_ledger": b"id;value\n1;2\n",
    "long_row": b"run_id,name,status\n20240101-000000-demo,demo,ok,surplus,values\n",
    "blank_header": b"\nrun_id,name,status\n20240101-000000-demo,demo,ok\n",
}


@pytest.mark.parametrize("kind", DAMAGED)
def test_a_damaged_ledger_is_one_line_and_never_rewritten(tmp_path, capsys, producer, kind):
    runs_dir = tmp_path / "runs"
    runs_dir.mkdir()
    (runs_dir / "index.csv").write_bytes(DAMAGED[kind])
    err = _one_line_error(capsys, main(["runs", "--runs-dir", str(runs_dir)]))
    assert f"cllama runs: error: {runs_dir / 'index.csv'}: not a cllama ledger (" in err, err
    assert err.endswith("; move it aside (a new one is started) or fix it"), err
    with pytest.raises(ValueError, match="not a cllama ledger"):
        ledger.update_ledger(runs_dir, GOOD_ROW)
    path = _pipeline(tmp_path, [{"name": "produce", "notebook": str(producer)}])
    err = _one_line_error(capsys, main(["run", str(path), "--runs-dir", str(runs_dir), "--quiet"]))
    assert "not a cllama ledger" in err
    assert (runs_dir / "index.csv").read_bytes() == DAMAGED[kind]  # untouched
    assert {p.name for p in runs_dir.iterdir()} <= {"index.csv", ".index.lock"}  # no run folder, no temporaries


def test_a_ledger_damaged_during_a_run_is_left_as_it_is(tmp_path, capsys):
    runs_dir = tmp_path / "runs"
    damage = _notebook(tmp_path / "damage.ipynb", 'ledger = ""  # a file to spoil\noutput_dir = "out"  # results',
                       'from pathlib import Path\nPath(ledger).write_bytes(b"\\xff\\xfe spoiled")\n'
                       'write_results(output_dir, stage="damage")')
    path = _pipeline(tmp_path, [{"name": "damage", "notebook": str(damage),
                                 "params": {"ledger": str(runs_dir / "index.csv")}}])
    assert main(["run", str(path), "--runs-dir", str(runs_dir), "--quiet"]) == 0  # the stage itself is fine
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "ledger not updated: " in err and "not a cllama ledger" in err, err
    assert (runs_dir / "index.csv").read_bytes() == b"\xff\xfe spoiled"
    [run] = [json.loads(p.read_text()) for p in runs_dir.glob("*/run.json")]
    assert run["status"] == "ok"


def test_an_older_ledger_with_fewer_columns_and_unknown_columns_is_read_and_kept(tmp_path, capsys):
    runs_dir = tmp_path / "runs"
    runs_dir.mkdir()
    with open(runs_dir / "index.csv", "w", newline="", encoding="utf-8") as f:
        f.write("\ufeff")  # a spreadsheet's byte order mark
        writer = csv.writer(f)
        writer.writerow(["run_id", "name", "status", "start", "duration_s", "final_loss", "pass@1 mbpp/greedy",
                         "my_note"])
        writer.writerow(["20240101-000000-old", "démo", "ok", "2024-01-01T00:00:00", "10", "2.25", "0.1", "kept"])
        writer.writerow(["20240102-000000-short", "demo", "failed"])  # a short row: the rest empty
    assert main(["runs", "--runs-dir", str(runs_dir)]) == 0
    out = capsys.readouterr().out
    assert "20240101-000000-old" in out and "démo" in out and "20240102-000000-short" in out
    rows = ledger.read_ledger_rows(runs_dir)
    assert all(set(ledger.LEDGER_FIELDS) <= set(r) for r in rows) and rows[0]["val_loss"] == ""
    ledger.update_ledger(runs_dir, {**GOOD_ROW, "run_id": "20240103-000000-new"})
    with open(runs_dir / "index.csv", newline="", encoding="utf-8") as f:
        rewritten = list(csv.DictReader(f))
    assert [r["run_id"] for r in rewritten] == ["20240101-000000-old", "20240102-000000-short", "20240103-000000-new"]
    assert rewritten[0]["my_note"] == "kept" and rewritten[0]["pass@1 mbpp/greedy"] == "0.1"
    assert rewritten[0]["name"] == "démo" and rewritten[1]["status"] == "failed" and rewritten[2]["my_note"] == ""
    frame = ledger.read_ledger(runs_dir)
    assert list(frame["final_loss"])[0] == 2.25 and len(frame) == 3


def test_an_empty_ledger_file_is_an_empty_ledger(tmp_path, capsys):
    (tmp_path / "index.csv").write_bytes(b"")
    assert ledger.read_ledger_rows(tmp_path) == []
    assert main(["runs", "--runs-dir", str(tmp_path)]) == 0 and "no runs in" in capsys.readouterr().out
    ledger.update_ledger(tmp_path, GOOD_ROW)
    assert [r["run_id"] for r in ledger.read_ledger_rows(tmp_path)] == [GOOD_ROW["run_id"]]


# ---- 3. references checked against what the producing notebook writes -------------------------------------------
@pytest.mark.parametrize("ref, message", [
    ("${produce.artifacts.ckpt}", r"stage 'consume' param 'path': \$\{produce.artifacts.ckpt\}: stage 'produce' "
                                  r"\(.*produce.ipynb\) produces artifacts \['checkpoint', 'metrics'\]; "
                                  r"did you mean 'checkpoint'\?"),
    ("${produce.metrics.los}", r"produces metrics \['loss', 'tokens_per_s'\]; did you mean 'loss'\?"),
    ("${produce.params.nothing_alike}", r"produces params \['size'\]$"),
])
def test_check_refuses_a_reference_to_a_name_the_stage_does_not_write(tmp_path, capsys, producer, ref, message):
    consumer = _notebook(tmp_path / "consume.ipynb", 'path = ""  # a file\noutput_dir = "out"  # results',
                         'write_results(output_dir, stage="consume")')
    path = _pipeline(tmp_path, [{"name": "produce", "notebook": str(producer)},
                                {"name": "consume", "notebook": str(consumer), "params": {"path": ref}}])
    err = _one_line_error(capsys, main(["run", str(path), "--check"]))
    assert re.search(message, err), err
    assert main(["run", str(path), "--check", "--set", "consume.path=${produce.artifacts.checkpoint}"]) == 0


def test_check_says_which_references_it_could_not_read(tmp_path, capsys):
    dynamic = _notebook(tmp_path / "dynamic.ipynb", 'fmt = "ms"  # a format\noutput_dir = "out"  # results',
                        'names = {"ms": "ms_dir"}\n'
                        'write_results(output_dir, stage="dynamic", artifacts={names[fmt]: output_dir, "table": 1},\n'
                        '              metrics=dict(loss=1.0))')
    consumer = _notebook(tmp_path / "consume.ipynb", 'path = ""  # a file\nvalue = 0.0  # a number\n'
                         'output_dir = "out"  # results', 'write_results(output_dir, stage="consume")')
    path = _pipeline(tmp_path, [
        {"name": "dynamic", "notebook": str(dynamic)},
        {"name": "consume", "notebook": str(consumer),
         "params": {"path": "${dynamic.artifacts.model_dir} ${dynamic.artifacts.table} ${run_dir}",
                    "value": "${dynamic.metrics.loss}"}}])
    assert main(["run", str(path), "--check"]) == 0
    report = json.loads(capsys.readouterr().out)
    notes = report["checks"][1]["references"]
    assert notes["${dynamic.artifacts.table}"].startswith("checked: ")
    assert notes["${dynamic.artifacts.model_dir}"].startswith(
        "not checked: stage 'dynamic' (") and "key names[fmt]" in notes["${dynamic.artifacts.model_dir}"]
    assert "metrics=dict(loss=1.0)" in notes["${dynamic.metrics.loss}"]
    assert notes["${run_dir}"] == "the run folder"


@pytest.mark.parametrize("path", PIPELINES, ids=lambda p: p.stem)
def test_every_shipped_pipeline_passes_the_check(path, capsys):
    assert main(["run", path.stem, "--check"]) == 0, capsys.readouterr().err
    report = json.loads(capsys.readouterr().out)
    notes = {ref: note for entry in report["checks"] for ref, note in entry.get("references", {}).items()}
    assert notes and all(n.startswith(("checked: ", "not checked: ", "the run folder")) for n in notes.values())
    pipeline = runs.load_pipeline(path)
    assert {s.name for s in pipeline.stages} == {e["stage"] for e in report["checks"]}
