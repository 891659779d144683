"""The pipeline runner: run folders, stage outputs passed on by name, failures, the ledger,
and parameter validation. Stages here are small notebooks written by the tests."""
import json
from pathlib import Path

import nbformat
import pytest
import yaml
from nbformat.v4 import new_code_cell, new_notebook

from cllama.cli import main
from cllama.workbench import ledger, runner
from cllama.workbench import pipeline as runs


def _notebook(path: Path, parameters: str, body: str) -> Path:
    nb = new_notebook(metadata={"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}})
    cell = new_code_cell(parameters)
    cell.metadata["tags"] = ["parameters"]
    nb.cells = [new_code_cell("from pathlib import Path\n\nfrom cllama.workbench.results import write_results"), cell,
                new_code_cell(body)]
    nbformat.write(nb, path)
    return path


@pytest.fixture(scope="module")
def notebooks(tmp_path_factory):
    root = tmp_path_factory.mktemp("notebooks")
    emit = _notebook(root / "emit.ipynb", 'value = 1  # a number\ntext = "hello"  # written to a file\n'
                                          'output_dir = "out"  # results go here',
                     'out = Path(output_dir)\nout.mkdir(parents=True, exist_ok=True)\n'
                     '(out / "data.txt").write_text(text * value)\n'
                     'write_results(out, stage="emit", metrics={"value": value * 2},'
                     ' artifacts={"data": out / "data.txt"})')
    consume = _notebook(root / "consume.ipynb", 'path = ""  # a file to read\nnumber = 0.0  # a number to report\n'
                                                'output_dir = "out"  # results go here',
                        'content = Path(path).read_text()\n'
                        'write_results(output_dir, stage="consume", metrics={"number": number, "chars": len(content)},'
                        ' params={"content": content})')
    fail = _notebook(root / "fail.ipynb", 'output_dir = "out"  # results go here',
                     'raise ValueError("boom: this stage fails on purpose")')
    return {"emit": emit, "consume": consume, "fail": fail}


def _pipeline(tmp_path: Path, stages: list, name: str = "test", params: dict | None = None) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"name": name, "params": params or {}, "stages": stages}))
    return path


def test_outputs_of_one_stage_reach_the_next(notebooks, tmp_path):
    pipeline = runs.load_pipeline(_pipeline(tmp_path, [
        {"name": "emit", "notebook": str(notebooks["emit"]), "params": {"value": 3}},
        {"name": "consume", "notebook": str(notebooks["consume"]),
         "params": {"path": "${emit.artifacts.data}", "number": "${emit.metrics.value}"}}]),
        overrides={"emit.text": "ab"})
    result = runner.run_pipeline(pipeline, tmp_path / "runs", progress=False)
    assert result.status == "ok" and [s.status for s in result.stages] == ["ok", "ok"]
    run_dir = result.run_dir
    assert run_dir.parent == tmp_path / "runs" and run_dir.name.endswith("-test")
    assert (run_dir / "00_emit.ipynb").is_file() and (run_dir / "01_consume.ipynb").is_file()
    consumed = json.loads((run_dir / "01_consume" / "results.json").read_text())
    assert consumed["params"]["content"] == "ababab" and consumed["metrics"] == {"number": 6.0, "chars": 6.0}
    resolved = json.loads((run_dir / "params.json").read_text())
    assert resolved["consume"]["path"] == str(run_dir / "00_emit" / "data.txt")
    assert resolved["consume"]["number"] == 6.0  # a whole-string reference keeps the number
    assert resolved["emit"]["output_dir"] == str(run_dir / "00_emit")
    assert "stage consume ok" in (run_dir / "run.log").read_text()
    assert json.loads((run_dir / "run.json").read_text())["status"] == "ok"
    [row] = ledger.read_ledger_rows(tmp_path / "runs")
    assert row["run_id"] == run_dir.name and row["status"] == "ok" and row["failed_stage"] == ""
    assert json.loads(row["metrics"]) == {"emit.value": 6.0, "consume.number": 6.0, "consume.chars": 6.0}
    assert json.loads(row["params"])["emit"] == {"value": 3, "text": "ab"}
    executed = nbformat.read(run_dir / "00_emit.ipynb", 4)
    assert any("injected-parameters" in c.metadata.get("tags", []) for c in executed.cells)


def test_failing_stage_stops_the_run_and_keeps_its_notebook(notebooks, tmp_path, capsys):
    path = _pipeline(tmp_path, [{"name": "emit", "notebook": str(notebooks["emit"])},
                                {"name": "fail", "notebook": str(notebooks["fail"])},
                                {"name": "consume", "notebook": str(notebooks["consume"]),
                                 "params": {"path": "${emit.artifacts.data}"}}], name="broken")
    code = main(["run", str(path), "--runs-dir", str(tmp_path / "runs"), "--quiet"])
    assert code == 1 and "stage 'fail' failed: ValueError: boom" in capsys.readouterr().err
    [row] = ledger.read_ledger_rows(tmp_path / "runs")
    assert row["status"] == "failed" and row["failed_stage"] == "fail"
    run_dir = Path(row["run_dir"])
    executed = (run_dir / "01_fail.ipynb").read_text()
    assert "boom: this stage fails on purpose" in executed and "ValueError" in executed
    assert not (run_dir / "02_consume.ipynb").exists()
    stages = json.loads((run_dir / "run.json").read_text())["stages"]
    assert [s["status"] for s in stages] == ["ok", "failed", "skipped"]
    assert "FAILED" in (run_dir / "run.log").read_text()


def test_a_second_run_adds_a_second_ledger_row(notebooks, tmp_path):
    path = _pipeline(tmp_path, [{"name": "emit", "notebook": str(notebooks["emit"])}], name="twice")
    first = runner.run_pipeline(runs.load_pipeline(path), tmp_path / "runs", progress=False)
    second = runner.run_pipeline(runs.load_pipeline(path, {"value": 5}), tmp_path / "runs", progress=False)
    frame = ledger.read_ledger(tmp_path / "runs")
    assert list(frame["run_id"]) == [first.run_id, second.run_id] and first.run_dir != second.run_dir
    assert json.loads(frame.iloc[1]["metrics"]) == {"emit.value": 10.0}
    assert list(ledger.select_runs(tmp_path / "runs", ["twice"])["run_id"]) == [second.run_id]
    assert list(ledger.select_runs(tmp_path / "runs", last=1)["run_id"]) == [second.run_id]
    with pytest.raises(ValueError, match="no run matches 'nothing'"):
        ledger.select_runs(tmp_path / "runs", ["nothing"])


@pytest.mark.parametrize("stages, overrides, message", [
    ([{"name": "emit", "notebook": "EMIT", "params": {"valu": 2, "colour": "red"}}], None,
     r"stage 'emit' \(emit.ipynb\): unknown parameter\(s\) \['colour', 'valu'\]; emit.ipynb takes \['text', 'value'\]"),
    ([{"name": "emit", "notebook": "EMIT", "params": {"value": "three"}}], None,
     r"value must be a number like its default 1 \(got 'three'\)"),
    ([{"name": "emit", "notebook": "EMIT", "params": {"output_dir": "x"}}], None, "output_dir is set by the runner"),
    ([{"name": "consume", "notebook": "CONSUME", "params": {"path": "${emit.artifacts.data}"}},
      {"name": "emit", "notebook": "EMIT"}], None, r"'emit' is not an earlier stage"),
    ([{"name": "emit", "notebook": "EMIT"}, {"name": "consume", "notebook": "CONSUME",
                                             "params": {"path": "${emit.outputs.data}"}}], None,
     r"write \$\{STAGE.artifacts.NAME\}"),
    ([{"name": "emit", "notebook": "EMIT"}], {"nostage.value": 1}, "no stage named 'nostage'"),
    ([{"name": "emit", "notebook": "EMIT"}], {"colour": 1}, "no stage's notebook has a parameter 'colour'"),
    ([{"name": "emit", "notebook": "EMIT"}, {"name": "emit", "notebook": "EMIT"}], None, "used twice"),
    ([{"name": "emit", "notebook": "missing.ipynb"}], None, "notebook missing.ipynb not found"),
])
def test_bad_pipelines_are_clear_errors(notebooks, tmp_path, stages, overrides, message):
    for stage in stages:
        stage["notebook"] = {"EMIT": str(notebooks["emit"]), "CONSUME": str(notebooks["consume"])}.get(
            stage["notebook"], stage["notebook"])
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        runs.load_pipeline(_pipeline(tmp_path, stages), overrides)


def test_shared_params_and_a_missing_artifact(notebooks, tmp_path):
    with pytest.raises(ValueError, match=r"params \['nobody'\] are declared by no stage's notebook"):
        runs.load_pipeline(_pipeline(tmp_path, [{"name": "emit", "notebook": str(notebooks["emit"])}],
                                     params={"nobody": 1}))
    stages = [{"name": "emit", "notebook": str(notebooks["emit"])},
              {"name": "consume", "notebook": str(notebooks["consume"]),
               "params": {"path": "${emit.artifacts.nothing}"}}]
    with pytest.raises(ValueError, match=r"\$\{emit.artifacts.nothing\}: stage 'emit' \(.*emit.ipynb\) produces "
                                         r"artifacts \['data'\]"):  # read from the notebook's source, before running
        runs.load_pipeline(_pipeline(tmp_path, stages, params={"value": 4}))
    # a notebook whose artifact names are computed: the reference is checked when the run resolves it
    stages[0]["notebook"] = str(_notebook(tmp_path / "emit_dynamic.ipynb", 'value = 1  # a number\n'
                                          'output_dir = "out"  # results go here',
                                          'write_results(output_dir, stage="emit", metrics={"value": value},'
                                          ' artifacts={"da" + "ta": output_dir})'))
    pipeline = runs.load_pipeline(_pipeline(tmp_path, stages, params={"value": 4}))
    assert pipeline.stages[0].params == {"value": 4}
    assert pipeline.stages[1].params == {"path": "${emit.artifacts.nothing}"}
    result = runner.run_pipeline(pipeline, tmp_path / "runs", progress=False)
    assert result.status == "failed" and result.failed_stage.name == "consume"
    assert "stage 'emit' wrote no artifacts 'nothing'; it has ['data']" in result.failed_stage.error
    assert (result.run_dir / "00_emit" / "kernel.log").is_file()  # the kernel process's own output


def test_overrides_parse_as_yaml():
    assert runs.parse_overrides(["a.b=3", "c=[1, 2]", "d=true", "e=text", "f="]) == \
        {"a.b": 3, "c": [1, 2], "d": True, "e": "text", "f": ""}
    with pytest.raises(ValueError, match="write STAGE.PARAM=VALUE"):
        runs.parse_overrides(["novalue"])
